#!/usr/bin/env bash
# The whole GPU check of issue 8 in one call, for a lent GPU machine (the `device` tool), which has the
# NVIDIA driver and CUDA but no Rust toolchain and no network. Prepare here with `make gpu-bundle`
# (release `moellava`, the GPU test binary and gen_random_model, gzipped in .gpu/), then run from the
# repository root with `.gpu` carried:
#
#   device run  command: "bash tools/gpu_check.sh"   carry: [".gpu"]   timeout_s: 540
#
# Writes logs and JSON under $OUT and prints a summary last. Stages, each with its own time limit so
# one hang cannot eat the lease: (1) the kernel and whole-model tests against the CPU backend,
# (2) bench on the toy phi2 q4 model (cpu vs cuda, expert budgets); the limits of (1)–(2) add to 470 s,
# inside the 540 s above. (3) Instead of them with GPU_CHECK_REAL=1 (a second call, timeout_s 600; its
# limits add to 720 s, so the last budget may be cut short), a real-size random Phi2-4e q4 file generated there and benched at
# expert budgets none/100/50/25%.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
[ -f .gpu/moellava.gz ] || { echo "no .gpu/moellava.gz: run 'make gpu-bundle' here and carry .gpu"; exit 2; }
B=/tmp/gpu-bin
mkdir -p $B && for f in moellava cuda_backend gen_random_model; do gunzip -c .gpu/$f.gz > $B/$f && chmod +x $B/$f; done

# NVRTC: cudarc opens it by name (libnvrtc.so, libnvrtc.so.12, ...); the machine's may be CUDA 13's
# libnvrtc.so.13, so give it the plain name in a folder of our own.
nvrtc=$(ls /usr/local/cuda/lib64/libnvrtc.so.* /usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so.* \
          $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | tr ' ' '\n' | sed 's|$|/nvidia/*/lib/libnvrtc.so.*|') \
          2>/dev/null | grep -v -e builtins -e alt | head -1)
[ -n "$nvrtc" ] || { echo "no libnvrtc on this machine"; exit 2; }
mkdir -p /tmp/nvrtc && ln -sf "$nvrtc" /tmp/nvrtc/libnvrtc.so
export LD_LIBRARY_PATH=/tmp/nvrtc:$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}
export MOELLAVA_ROOT=$PWD MOELLAVA_BIN=$B/moellava MOELLAVA_CUDA_MODELS=/tmp/gpu-models MOELLAVA_PTX_CACHE=/tmp/ptx-cache
echo "nvrtc: $nvrtc" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/env.txt"

echo "== 0. test models (tools/gen_checkpoint.py, then our convert)"
mkdir -p /tmp/gpu-models
for b in phi2 stablelm qwen; do
  python3 tools/gen_checkpoint.py --backbone $b --tower clip --out /tmp/ckpt-$b > /dev/null \
    && "$B/moellava" convert /tmp/ckpt-$b/model -o /tmp/gpu-models/$b-q4.gguf --preset q4 --quiet --force \
    && "$B/moellava" convert /tmp/ckpt-$b/model -o /tmp/gpu-models/$b-f16.gguf --type f16 --quiet --force \
    || { echo "making the $b test models failed"; exit 2; }
done

if [ "${GPU_CHECK_REAL:-0}" != 1 ]; then
echo "== 1. kernels and models against the CPU backend"
timeout 240 "$B/cuda_backend" --nocapture --test-threads 1 > "$OUT/cuda_backend.log" 2>&1
echo "cuda_backend exit $?" | tee -a "$OUT/summary.txt"
grep -E "^test |GPU:|skipped|panicked|NMSE|test result" "$OUT/cuda_backend.log" | tail -20

echo "== 2. toy model: cpu vs cuda, expert budgets"
M=/tmp/gpu-models/phi2-q4.gguf
for cfg in "cpu" "cuda" "cuda --gpu-mem 50% --miss-policy copy" "cuda --gpu-mem 25% --miss-policy copy" "cuda --gpu-mem 25% --miss-policy cpu"; do
  name=$(echo "$cfg" | tr -c 'a-z0-9\n' '_' | tr -s '_')
  timeout 40 "$B/moellava" bench -m "$M" --device $cfg -p 64,256 -n 32 -r 3 --json > "$OUT/bench_toy_$name.json" 2> "$OUT/bench_toy_$name.err"
  echo "bench toy $cfg: exit $?" | tee -a "$OUT/summary.txt"
done
timeout 30 "$B/moellava" run -m "$M" --device cuda --image tests/fixtures/images/wide.png -p "What is in the picture?" --json \
  > "$OUT/run_cuda.json" 2> "$OUT/run_cuda.err"; echo "run cuda: exit $?" | tee -a "$OUT/summary.txt"
fi

if [ "${GPU_CHECK_REAL:-0}" = 1 ]; then
  echo "== 3. real-size random Phi2-4e q4"
  R=/tmp/phi2-4e-q4.gguf
  timeout 240 "$B/gen_random_model" --family phi2 --plan q4 -o "$R" > "$OUT/gen.log" 2>&1
  for mem in none 100% 50% 25%; do
    extra=""; [ "$mem" = none ] || extra="--gpu-mem $mem --miss-policy auto"
    timeout 120 "$B/moellava" bench -m "$R" --device cuda $extra -p 128,512 -n 32 -r 2 --json \
      > "$OUT/bench_real_${mem%\%}.json" 2> "$OUT/bench_real_${mem%\%}.err"
    echo "bench real $mem: exit $?" | tee -a "$OUT/summary.txt"
  done
fi

echo "== summary"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("bench_*.json")):
    try:
        d = json.loads(f.read_text())
    except Exception as e:
        print(f"{f.name}: unreadable ({e})"); continue
    m = {x["name"]: x["ours"] for x in d["metrics"]}
    keys = ["prefill_64_tok_s", "prefill_256_tok_s", "prefill_128_tok_s", "prefill_512_tok_s", "decode_tok_s",
            "decode_roofline_fraction", "gpu_expert_hit_rate", "gpu_mem_used_bytes"]
    print(f.name, d.get("device"), " ".join(f"{k}={m[k]:.4g}" for k in keys if m.get(k) is not None))
PY
cat "$OUT/summary.txt"
