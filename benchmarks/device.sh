#!/usr/bin/env bash
# One prepared device run: the benchmarks where the passes should pay, at
# real widths, on the machine's GPU, printed as one table to put into
# docs/BENCHMARKS.md (naming the GPU). At most 8 minutes, registries only.
#
#   benchmarks/device.sh          a venv of its own (DEVICE_VENV, default
#                                 build/device-venv) with mlx[cuda12]; when
#                                 that install fails, the mlx already
#                                 installed (PYTHON, .venv/bin/python, python3)
#   benchmarks/device.sh --quick  the same steps on the CPU at tiny sizes, in
#                                 seconds, with the installed mlx (make test)
#
# Steps: fuse_glu (dense 2048/8192, MoE 64 experts), fuse_qkv (2048, 32/8
# heads), last_token (Qwen2.5-0.5B widths, 24 layers), and a decode/prefill
# A/B through mlx-lm's stream_generate on the pretrained checkpoint
# (graphpatch.testing.checkpoint, or MODEL), its variants interleaved.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's graphpatch

quick=0
case "${1:-}" in
--quick) quick=1 ;;
"") ;;
*)
    echo "error: usage: benchmarks/device.sh [--quick]" >&2
    exit 2
    ;;
esac
start=$SECONDS
deadline=$((SECONDS + 480))
say() { echo "device.sh: $*" >&2; }

installed_python() {
    local p
    for p in "${PYTHON:-}" .venv/bin/python python3; do
        if [ -n "$p" ] && "$p" -c "import mlx.core, mlx_lm" >/dev/null 2>&1; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# The project's dependencies but mlx (mlx[cpu] would overwrite the CUDA
# backend's libmlx), and the checkpoint's converters (gguf, tokenizers).
requirements() {
    "$1" - <<'EOF'
import re
try:
    import tomllib
    project = tomllib.load(open("pyproject.toml", "rb"))["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
except ImportError:  # before Python 3.11
    wanted = "mlx-lm safetensors typer rich huggingface_hub transformers".split()
wanted = [d for d in wanted if not re.match("pytest|hypothesis|ruff|mypy", d)]
for d in wanted:
    if not re.match(r"mlx($|[^-\w])", d):
        print(d.split(";")[0].strip())
EOF
}

install() {
    local venv=${DEVICE_VENV:-build/device-venv}
    python3 -m venv "$venv" >&2 || return 1
    say "installing mlx[cuda12] into $venv"
    "$venv/bin/pip" install -q "mlx[cuda12]" >&2 || return 1
    "$venv/bin/pip" install -q $(requirements "$venv/bin/python") >&2 || return 1
    echo "$venv/bin/python"
}

if [ $quick = 1 ]; then
    py=$(installed_python) || { echo "error: no python with mlx and mlx-lm" >&2; exit 2; }
    how="--quick: tiny sizes, the installed mlx ($py), no install"
elif py=$(install); then
    how="mlx[cuda12] installed into ${DEVICE_VENV:-build/device-venv}"
else
    py=$(installed_python) || { echo "error: mlx[cuda12] could not be installed, and no python has mlx" >&2; exit 2; }
    how="mlx[cuda12] could not be installed: using the mlx already installed ($py)"
    say "$how"
fi

device=$("$py" -c "import mlx.core as mx; print(mx.default_device(), 'mlx', mx.__version__)")
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
if [ $quick = 0 ] && [ "${device#Device(gpu}" = "$device" ]; then
    say "mlx's default device is $device: these figures are not a GPU's"
fi

if [ $quick = 1 ]; then
    model=$(mktemp -d)/llama
    trap 'rm -rf "$(dirname "$model")"' EXIT
    "$py" -m graphpatch.testing.zoo llama "$model" >/dev/null || exit 1
    steps=(
        "fuse_glu|benchmarks/fuse_glu.py --rounds 1 --dense {\"hidden\":64,\"intermediate\":128} --moe {\"hidden\":64,\"intermediate\":64,\"experts\":4,\"top_k\":2}"
        "fuse_qkv|benchmarks/fuse_qkv.py --hidden 64 --heads 4,2 --rounds 1"
        "last_token|benchmarks/last_token.py --layers 1 --lengths 16 --rounds 1 --config {\"hidden_size\":64,\"intermediate_size\":128,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"vocab_size\":512}"
        "checkpoint|benchmarks/real_checkpoint.py --model $model --rounds 1 --prompt-tokens 16 --decode-tokens 4"
    )
else
    steps=(
        "fuse_glu|benchmarks/fuse_glu.py --rounds 7"
        "fuse_qkv|benchmarks/fuse_qkv.py --hidden 2048 --heads 32,8 --rounds 5"
        "last_token|benchmarks/last_token.py --layers 24 --lengths 128,512,2048 --rounds 5"
        "checkpoint|benchmarks/real_checkpoint.py --rounds 6 --prompt-tokens 512 --decode-tokens 64${MODEL:+ --model $MODEL}"
    )
fi

out=$(mktemp -d)
failed=0
for step in "${steps[@]}"; do
    name=${step%%|*}
    left=$((deadline - SECONDS))
    if [ $left -le 0 ]; then
        echo "skipped: the 8 minutes are spent" >"$out/$name"
        failed=1
        continue
    fi
    say "$name (at most ${left}s)"
    # shellcheck disable=SC2086  # the step's words are its arguments
    timeout -k 5 $left "$py" ${step#*|} >"$out/$name" 2>"$out/$name.err"
    code=$?
    if [ $code != 0 ]; then
        why=$(tail -1 "$out/$name.err")
        [ $code = 124 ] && why="timed out after ${left}s"
        echo "failed (exit $code): $why" >>"$out/$name"
        failed=1
    fi
done

echo "graphpatch device run, $(date -u +%F): ${gpu:-no GPU named by nvidia-smi}; $device; $how"
echo
echo "| benchmark | what it printed |"
echo "|---|---|"
for step in "${steps[@]}"; do
    name=${step%%|*}
    while IFS= read -r line; do
        [ -z "${line// /}" ] && continue
        line=$(echo "$line" | tr -s ' ' | sed 's/|/\\|/g')
        echo "| $name | $line |"
    done <"$out/$name"
done
echo
echo "took $((SECONDS - start))s"
rm -rf "$out"
exit $failed
