"""The storage layer and the stage commit protocol, on a local dir and on a real S3 server (moto)."""

import time
from pathlib import Path

import pyarrow as pa
import pytest
from testkit import OutageProxy

from saerl_ray.core import storage
from saerl_ray.core.stage import MARKER, Stage, StageNotReady, marker_of


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_run_dir")


def test_round_trips_and_listing(base):
    storage.write_json(storage.join(base, "a", "x.json"), {"k": [1, 2]})
    storage.write_text(storage.join(base, "a", "b", "y.txt"), "héllo")
    t = pa.table({"id": ["p", "q"], "v": [1.5, 2.5]})
    storage.write_parquet(t, storage.join(base, "a", "t.parquet"))
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"k": [1, 2]}
    assert storage.read_text(storage.join(base, "a", "b", "y.txt")) == "héllo"
    assert storage.read_parquet(storage.join(base, "a", "t.parquet"), columns=["v"]).column(0).to_pylist() == [1.5, 2.5]
    assert storage.parquet_columns(storage.join(base, "a", "t.parquet")) == ["id", "v"]
    assert storage.list_dir(storage.join(base, "a")) == ["t.parquet", "x.json"]
    assert storage.list_dir(storage.join(base, "a"), recursive=True) == ["b/y.txt", "t.parquet", "x.json"]
    assert storage.list_dir(storage.join(base, "a"), suffix=".json") == ["x.json"]
    assert storage.list_dir(storage.join(base, "nothing")) == []
    assert storage.is_dir(storage.join(base, "a")) and not storage.exists(storage.join(base, "a", "zz"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "a", "zz"))
    storage.delete(storage.join(base, "a"))
    assert storage.list_dir(storage.join(base, "a"), recursive=True) == []
    storage.delete(storage.join(base, "a"))  # deleting what is gone is fine


def test_jsonl_reader_names_line_and_skips_bom(base):
    p = storage.join(base, "rows.jsonl")
    storage.write_bytes(p, '\ufeff{"a": 1}\n\n{"a": 2}\n'.encode())
    assert list(storage.iter_jsonl(p)) == [(0, {"a": 1}), (2, {"a": 2})]
    storage.write_text(p, '{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 1"):
        list(storage.iter_jsonl(p))


def test_copy_tree_and_local_dir_fetch_once(base, tmp_path, monkeypatch):
    monkeypatch.setenv("SAERL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    dst = storage.join(base, "models", "m")
    assert storage.copy_tree(src, dst) == 2
    local = storage.local_dir(dst, version="v1")
    assert (local / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    if storage.is_uri(base):
        assert str(local).startswith(str(tmp_path / "cache"))
        storage.write_bytes(storage.join(dst, "config.json"), b'{"changed": 1}')
        assert (storage.local_dir(dst, version="v1") / "config.json").read_text() == "{}"  # cached copy
        assert (storage.local_dir(dst, version="v2") / "config.json").read_text() == '{"changed": 1}'


def test_stage_protocol_marker_last_and_killed_writer_untrusted(base):
    st = Stage(base, "features", "fp1")
    out = st.begin()
    storage.write_text(storage.join(out, "part-00000.parquet"), "block 0")
    # killed here: no marker, nothing downstream may trust the stage
    assert not st.done()
    with pytest.raises(StageNotReady, match="saerl-ray features"):
        marker_of(base, "features")
    # a rerun with the same fingerprint keeps the finished block
    out = Stage(base, "features", "fp1").begin(keep_partial=True)
    assert storage.list_dir(out) == ["_PARTIAL.json", "part-00000.parquet"]
    st.commit({"rows": 1})
    assert st.done() and marker_of(base, "features") == "fp1"
    assert storage.read_json(storage.join(out, "summary.json")) == {"rows": 1}
    assert "_PARTIAL.json" not in storage.list_dir(out)
    # a new fingerprint: the old marker is gone before anything else, old files too
    st2 = Stage(base, "features", "fp2")
    assert not st2.done()
    out = st2.begin(keep_partial=True)
    assert MARKER not in storage.list_dir(out) and "part-00000.parquet" not in storage.list_dir(out)
    with pytest.raises(StageNotReady):
        marker_of(base, "features")


def test_unreachable_s3_retries_then_succeeds(s3_server, s3_run_dir, monkeypatch):
    """Fault (d): the store is unreachable for a few seconds during a write; the retry loop rides it out."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.25)
    with OutageProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        path = storage.join(s3_run_dir, "x.json")
        storage.write_json(path, {"before": True})
        proxy.down(seconds=2)
        t = time.time()
        storage.write_json(path, {"ok": True})
        assert time.time() - t >= 1.5  # it did wait for the store to come back
        assert storage.read_json(path) == {"ok": True}


def test_unreachable_s3_fails_clearly_and_leaves_no_marker(s3_server, s3_run_dir, monkeypatch):
    monkeypatch.setattr(storage, "RETRIES", 3)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.1)
    with OutageProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        st = Stage(s3_run_dir, "plan", "fp")
        out = st.begin()
        storage.write_text(storage.join(out, "plan.parquet"), "x")
        proxy.down(seconds=30)
        with pytest.raises(storage.StorageError, match=r"s3://saerl-test/.*summary.json.*3 attempts"):
            st.commit({"rows": 1})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert not Stage(s3_run_dir, "plan", "fp").done()
    assert storage.list_dir(storage.join(s3_run_dir, "plan")) == ["_PARTIAL.json", "plan.parquet"]


def test_sync_tree_streams_only_what_the_other_side_lacks(base, tmp_path):
    src = tmp_path / "ckpt"
    (src / "global_step2").mkdir(parents=True)
    (src / "global_step2" / "shard_0.pt").write_bytes(b"x" * 3000)
    (src / "latest").write_text("global_step2")
    remote = storage.join(base, "ckpt")
    assert storage.sync_tree(str(src), remote) == 2
    assert storage.sizes(remote) == {"global_step2/shard_0.pt": 3000, "latest": 12}
    assert storage.sync_tree(str(src), remote) == 0  # nothing new: nothing sent again
    (src / "global_step2" / "shard_1.pt").write_bytes(b"y" * 10)
    assert storage.sync_tree(str(src), remote) == 1
    back = tmp_path / "back"
    assert storage.sync_tree(remote, str(back)) == 3
    assert (back / "global_step2" / "shard_0.pt").read_bytes() == b"x" * 3000
    assert not [p for p in back.rglob("*") if storage.PARTIAL_TAG in p.name]


def test_checkpoint_mirror_push_publish_pull_prune(base, tmp_path):
    """What a trainer's nodes do with a library's node-local checkpoint folder (run_files.Mirror)."""
    from saerl_ray.trainers.run_files import Mirror

    remote = storage.join(base, "openrlhf", "ckpt")
    node_a, node_b = Mirror(str(tmp_path / "a"), remote), Mirror(str(tmp_path / "b"), remote)
    for step in (1, 2, 3):  # rank 0 on node a (module states + pointer), rank 1 on node b
        tag = f"_actor/global_step{step}"
        (tmp_path / "a" / tag).mkdir(parents=True)
        (tmp_path / "a" / tag / "mp_rank_00_model_states.pt").write_bytes(b"m%d" % step)
        (tmp_path / "a" / tag / "zero_pp_rank_0_optim_states.pt").write_bytes(b"o0")
        (tmp_path / "b" / tag).mkdir(parents=True)
        (tmp_path / "b" / tag / "zero_pp_rank_1_optim_states.pt").write_bytes(b"o1")
        (tmp_path / "a" / "_actor" / "latest").write_text(f"global_step{step}")
        assert node_a.push([tag, f"global_step{step}_hf"]) == 2 and node_b.push([tag]) == 1
        node_a.publish(["_actor/latest"])
        node_a.prune("_actor", "global_step", keep=2)
    assert node_b.read_pointer("_actor/latest") == "global_step3"
    stored = storage.list_dir(storage.join(remote, "_actor"), recursive=True)
    assert sorted({r.split("/")[0] for r in stored if "/" in r}) == ["global_step2", "global_step3"]
    # Resume on a fresh node c with a stale checkpoint of its own: it ends up with exactly the stored one.
    node_c = Mirror(str(tmp_path / "c"), remote)
    (tmp_path / "c" / "_actor" / "global_step9").mkdir(parents=True)
    (tmp_path / "c" / "_actor" / "latest").write_text("global_step9")
    assert node_c.pull(["_actor/global_step3"], ["_actor/latest"]) == 4
    got = sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert got == ["_actor/global_step3/mp_rank_00_model_states.pt", "_actor/global_step3/zero_pp_rank_0_optim_states.pt",
                   "_actor/global_step3/zero_pp_rank_1_optim_states.pt", "_actor/latest"]
    assert (tmp_path / "c" / "_actor" / "latest").read_text() == "global_step3"
    # Nothing stored (a new run): the node's folder is emptied, never resumed from a stale local copy.
    empty = Mirror(str(tmp_path / "c"), storage.join(base, "nothing"))
    assert empty.read_pointer("_actor/latest") is None and empty.pull([], []) == 0
    assert not list((tmp_path / "c").iterdir())


def test_fetch_gives_a_local_copy_of_an_object_and_a_local_path_unchanged(base, tmp_path):
    from saerl_ray.trainers.run_files import fetch, node_scratch

    src = storage.join(base, "openrlhf", "prompts.parquet")
    storage.write_parquet(pa.table({"prompt": ["a", "b"]}), src)
    local = fetch(src, str(tmp_path / "scratch"))
    assert pq_rows(local) == 2
    if storage.is_uri(base):
        assert local.startswith(str(tmp_path / "scratch"))
    else:
        assert local == src
    assert node_scratch(base, "openrlhf") == node_scratch(base, "openrlhf") != node_scratch(base + "x", "openrlhf")


def pq_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_table(path).num_rows


def test_a_killed_upload_is_not_mixed_into_the_next_one(base, tmp_path):
    """A run killed while uploading step 10 (pointer still at step 5) leaves shards of step 10 in the store;
    the resumed run's step 10 has shards of the same size, which sync_tree alone would skip."""
    from saerl_ray.trainers.run_files import OpenRLHFFiles

    files = OpenRLHFFiles(storage.join(base, "stage"), str(tmp_path / "scratch"), str(tmp_path / "ckpt"))
    remote = storage.join(base, "stage", "ckpt")
    storage.write_text(storage.join(remote, "_actor/latest"), "global_step5")
    storage.write_text(storage.join(remote, "_actor/global_step10/rank0.pt"), "OLD-RUN")
    storage.write_text(storage.join(remote, "_actor/global_step10/rank9.pt"), "orphan")  # no rank 9 now
    local = tmp_path / "ckpt" / "_actor"
    (local / "global_step10").mkdir(parents=True)
    (local / "global_step10" / "rank0.pt").write_text("NEW-RUN")
    (local / "latest").write_text("global_step10")
    files.upload([], "global_step10", keep=None)  # no Ray actors: this process is the one node
    assert storage.read_text(storage.join(remote, "_actor/global_step10/rank0.pt")) == "NEW-RUN"
    assert not storage.exists(storage.join(remote, "_actor/global_step10/rank9.pt"))
    assert storage.read_text(storage.join(remote, "_actor/latest")) == "global_step10"
    # The published tag is never discarded: a second upload of it (another node's part) keeps the first.
    storage.write_text(storage.join(remote, "_actor/global_step10/rank1.pt"), "node-b")
    files.upload([], "global_step10", keep=None)
    assert storage.read_text(storage.join(remote, "_actor/global_step10/rank1.pt")) == "node-b"


def test_a_local_run_dir_is_its_own_scratch_and_the_mirror_never_deletes_it(tmp_path, monkeypatch):
    """With a local run_dir the checkpoints are written in place: pulling must not empty the folder that
    is also the stored copy, and nothing is copied twice. SAERL_SCRATCH asks for node-local scratch."""
    from saerl_ray.trainers.run_files import Mirror, node_scratch

    monkeypatch.setenv("SAERL_SCRATCH", str(tmp_path / "node"))
    assert node_scratch(str(tmp_path / "run"), "openrlhf").startswith(str(tmp_path / "node"))
    monkeypatch.delenv("SAERL_SCRATCH")

    scratch = node_scratch(str(tmp_path / "run"), "openrlhf")
    assert scratch == str(tmp_path / "run" / "openrlhf")
    assert node_scratch("s3://bucket/run", "openrlhf") != scratch  # an object store: node-local scratch
    ckpt = Path(scratch) / "ckpt"
    (ckpt / "_actor" / "global_step3").mkdir(parents=True)
    (ckpt / "_actor" / "global_step3" / "rank0.pt").write_text("weights")
    (ckpt / "_actor" / "latest").write_text("global_step3")
    mirror = Mirror(str(ckpt), storage.join(scratch, "ckpt"))
    assert mirror.same and mirror.push(["_actor/global_step3"]) == 0
    mirror.discard(["_actor/global_step3"])
    mirror.pull([], [])  # a fresh start would empty a node-local folder; here it is the run's own copy
    assert (ckpt / "_actor" / "global_step3" / "rank0.pt").read_text() == "weights"
