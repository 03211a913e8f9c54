# MoE LoRA Studio on a CUDA machine. Installs exactly as README.md does (torch 2.13.0, CUDA build from PyPI).
#   docker build -t moe-lora-studio . && docker run --gpus all -p 127.0.0.1:7860:7860 moe-lora-studio
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /studio
COPY . .
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
RUN pip install torch==2.13.0 -e . -c constraints.txt
ENV STUDIO_HOME=/data
VOLUME /data
# The main job on the embedded default; real bases: --base <local dir or hub id>
CMD ["python", "-m", "studio.finetune", "--config", "recipes/tiny-moe-law.yaml"]
