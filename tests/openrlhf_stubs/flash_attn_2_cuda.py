# Empty on purpose. flash-attn is installed python-only in .venv-openrlhf (no nvcc, no GPU), and
# `import flash_attn` imports this compiled extension at top level. openrlhf.models imports
# flash_attn.bert_padding (pure torch) at module import, so an empty module lets OpenRLHF import on
# CPU. Any real flash-attention kernel call would still fail, which is what we want on a CPU box.
