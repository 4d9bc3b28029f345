#!/usr/bin/env bash
# Scale-out on a machine with >= 2 GPUs, each mode against its 1-GPU reference (benchmarks/ACCURACY.md, "Scale-out"):
#  1. model parallel: a Llama-3.1-8B-shaped P3 model (random weights) split by accelerate's device_map="auto";
#  2. data parallel: lm-eval under `accelerate launch`, one model copy per GPU.
# Needs: a tokenizer folder ($TOKENIZER, e.g. SmolLM2's from p3quant.models) and the data folder ($P3QUANT_DATA).
set -euo pipefail
: "${TOKENIZER:?set TOKENIZER to a tokenizer folder}" "${P3QUANT_DATA:?set P3QUANT_DATA to the evaluation data folder}"
export PYTHONUNBUFFERED=1
MODEL_DIR=${MODEL_DIR:-/tmp/p3-scaleout-llama}
LIMIT=${LIMIT:-1838}  # the whole PIQA validation set

echo "== model parallel (device_map=auto) vs one GPU"
python benchmarks/scaleout.py --hidden 4096 --layers 32 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256 --tokens 32 --batch 8
CUDA_VISIBLE_DEVICES=0 python benchmarks/scaleout.py --hidden 4096 --layers 32 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256 --tokens 32 --batch 8

echo "== data-parallel lm-eval: a 1B-class random Llama with the given tokenizer"
python - "$MODEL_DIR" "$TOKENIZER" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out, tok_dir = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(tok_dir)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=2048)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)
tok.save_pretrained(out)
PY
ARGS="--model p3 --model_args pretrained=$MODEL_DIR,preset=w4a8kv4p8,dtype=float16 --tasks p3_piqa --limit $LIMIT --batch_size 32"
start=$(date +%s.%N)
python -m p3quant.eval.lm_eval_cli $ARGS --device cuda:0 > /tmp/lm1.log 2>&1 || { tail -30 /tmp/lm1.log; exit 1; }
one=$(awk "BEGIN{print $(date +%s.%N) - $start}")
start=$(date +%s.%N)
OMP_NUM_THREADS=$(( $(nproc) / 2 )) accelerate launch --multi_gpu --num_processes 2 -m p3quant.eval.lm_eval_cli $ARGS > /tmp/lm2.log 2>&1 || { tail -30 /tmp/lm2.log; exit 1; }
two=$(awk "BEGIN{print $(date +%s.%N) - $start}")
grep -o "Running loglikelihood requests: 100%[^R]*" /tmp/lm1.log /tmp/lm2.log | tr -d '\r'
grep -E "p3_piqa|acc" /tmp/lm1.log | tail -3
grep -E "p3_piqa|acc" /tmp/lm2.log | tail -3
echo "lm-eval p3_piqa limit $LIMIT: 1 GPU ${one}s, 2 GPUs (accelerate launch) ${two}s, speed-up $(awk "BEGIN{printf \"%.2f\", $one / $two}")x"
