"""Tiny random models and tokenizers built from a config: what tests and CI smoke runs use
instead of hub downloads. Lives in the package so Ray workers can import it.

    python -c "from testkit import save_tiny_model; print(save_tiny_model('/tmp/tiny'))"
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """Byte-level WordLevel tokenizer (vocab 259), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {(chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"): i for i in range(256)}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0x00>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<0x00>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(num_layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random Llama-architecture causal LM (SmolLM2's family) small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(path: str | Path, num_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        tiny_model(num_layers, hidden, seed).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def commit_plan(run_dir: str | Path, table, fingerprint: str = "handmade-plan", **parquet_kwargs) -> None:
    """A hand-made plan table (plan.PLAN_SCHEMA columns) committed as the run's plan stage, as the
    `plan` stage would leave it: what sampler and trainer tests and benchmarks start from."""
    from saerl_ray.core import storage
    from saerl_ray.core.stage import Stage

    st = Stage(run_dir, "plan", fingerprint)
    storage.write_parquet(table, storage.join(st.begin(keep_partial=False), "plan.parquet"), **parquet_kwargs)
    st.commit({"planned": table.num_rows})


# ------------------------------------------------------------------ a real S3-compatible server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


class S3Server:
    """moto's standalone S3 server on 127.0.0.1:`port` (a real HTTP server speaking the S3 API).

        with S3Server(port) as s3:                       # sets AWS_ENDPOINT_URL & credentials
            s3.create_bucket("runs")                      # then s3://runs/... works everywhere
    """

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> "S3Server":
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        os.environ.update(self.env())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited with {self.proc.returncode}")
                time.sleep(0.2)
        raise TimeoutError(f"moto server did not answer on {self.endpoint} within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def create_bucket(self, bucket: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_REGION"]}).create_bucket(Bucket=bucket)
        return f"s3://{bucket}"

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class OutageProxy:
    """A TCP forwarder on 127.0.0.1 in front of `target_port` that can drop the line on demand: a
    network outage between the pipeline and its object store, while the store keeps its data.

        with OutageProxy(s3.port) as proxy:          # point AWS_ENDPOINT_URL at proxy.endpoint
            proxy.down(seconds=3)                    # refuse and cut connections for 3 s
    """

    def __init__(self, target_port: int):
        import socket

        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.up_at = 0.0
        self.conns: list = []
        self.closed = False

    def _pipe(self, a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def _serve(self) -> None:
        import socket
        import threading
        import time

        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if time.time() < self.up_at:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def down(self, seconds: float) -> None:
        """From now on for `seconds`: new connections are closed at once and open ones are cut."""
        import time

        self.up_at = time.time() + seconds
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass
        self.conns = []

    def __enter__(self) -> "OutageProxy":
        import threading

        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True
        self.sock.close()
