# Phi-3 LoRA: common commands. `make help` lists them.
PYTHON ?= python3

.PHONY: help setup test test-gpu demo bench bench-long kernel-choices tiny-data tiny-model

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup:  ## install the runtime + test dependencies; without an NVIDIA GPU, torch's CPU build (not the CUDA one)
	@$(PYTHON) -c "import torch" 2>/dev/null || if command -v nvidia-smi >/dev/null; \
	  then $(PYTHON) -m pip install torch; \
	  else $(PYTHON) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
	$(PYTHON) -m pip install -q -r requirements-test.txt

test:  ## the whole CPU test suite (Triton kernels run under TRITON_INTERPRET=1)
	$(PYTHON) -m pytest tests

test-gpu:  ## kernel + model tests on an NVIDIA GPU (bf16 at Phi-3-mini shapes)
	$(PYTHON) -m pytest tests -m cuda -v

demo:  ## LoRA-train the embedded tiny model on the demo chat data into runs/demo, then score held-out questions
	@if [ -f runs/demo/adapter_config.json ]; then echo "runs/demo is trained already (rm -r runs/demo to train it again)"; \
	  else $(PYTHON) train.py --data examples/chat.jsonl --out runs/demo; fi
	$(PYTHON) examples/eval_chat.py --adapter runs/demo

bench:  ## GPU benchmarks against transformers + peft (kernel, load/decode, training steps, chat data, same math, first steps)
	$(PYTHON) bench/bench_lora.py
	$(PYTHON) bench/bench_model.py
	$(PYTHON) bench/bench_train.py --ablations
	$(PYTHON) bench/bench_train.py --batch 2 --seq 4096
	$(PYTHON) bench/bench_train.py --no-checkpointing
	$(PYTHON) bench/bench_train.py --checkpoint-layers 24,16,8
	$(PYTHON) bench/bench_chat.py
	$(PYTHON) bench/bench_chat.py --rows 8
	$(PYTHON) bench/bench_same_math.py
	$(PYTHON) bench/bench_first_steps.py

bench-long:  ## GPU: attention kernels, long-context LoRA steps (16k to 131k tokens) against transformers + peft, train.py at 131k
	$(PYTHON) bench/bench_attention.py
	$(PYTHON) bench/bench_long.py
	$(PYTHON) bench/bench_long_train.py

kernel-choices:  ## GPU: time every kernel option at Phi-3 shapes on this GPU, into kernels/tables/<architecture>.json
	$(PYTHON) bench/make_kernel_choices.py

tiny-data:  ## WordNet pretraining text + demo chats (needs Debian's wordnet-base)
	$(PYTHON) examples/make_data.py

tiny-model:  ## pretrain the embedded tiny Phi-3 from scratch (GPU, a few minutes), into models/tiny-phi3
	$(PYTHON) train.py --full --init random --model models/tiny-phi3 --data examples/pretrain.jsonl \
	  --train-on all --packing --max-seq-len 512 --batch-size 64 --lr 3e-3 --warmup 0.02 --weight-decay 0.1 \
	  --epochs 20 --eval-fraction 0.005 --save-every 0 --log-every 50 --no-gradient-checkpointing --out runs/tiny-pretrain
	cp runs/tiny-pretrain/model.safetensors runs/tiny-pretrain/config.json models/tiny-phi3/
