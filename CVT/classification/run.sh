#!/usr/bin/env bash
# Launch tools/train.py or tools/test.py with torchrun, as upstream CvT's run.sh did with the
# deprecated torch.distributed.launch. Everything after the options below goes to the script.
set -euo pipefail

usage() {
    echo "usage: bash run.sh [-g GPUS] -t train|test|rebuild_bank [-p PORT] [-i] --cfg FILE [KEY VALUE ...]"
    echo "  -g, --gpus          processes to start (default: the number of GPUs, or 1 without any)"
    echo "  -t, --job-type      train, test, or rebuild_bank (refill ISTA2 banks; not upstream)"
    echo "  -p, --port          master port (default 9000)"
    echo "  -i, --install-deps  pip install -r the repository's requirements.txt first"
}

gpus="" job="" port=9000 install=0 extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -g|--gpus) gpus="$2"; shift 2 ;;
        -t|--job-type) job="$2"; shift 2 ;;
        -p|--port) port="$2"; shift 2 ;;
        -i|--install-deps) install=1; shift ;;
        -h|--help) usage; exit 1 ;;
        *) extra+=("$1"); shift ;;
    esac
done
case "$job" in
    train|test|rebuild_bank) ;;
    *) echo "unknown job type '${job}'"; usage; exit 1 ;;
esac
if [ -z "$gpus" ]; then
    gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
    [ "$gpus" -gt 0 ] || gpus=1
fi
cd "$(dirname "$0")"
if [ "$install" = 1 ]; then
    "${PYTHON:-python3}" -m pip install -r ../../requirements.txt -q
fi
if ! "${PYTHON:-python3}" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))' "$port" 2>/dev/null; then
    echo "run.sh: master port ${port} is already in use (another run?); choose a free one with -p PORT" >&2
    exit 1
fi
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port "$port" \
    --nproc_per_node "$gpus" "tools/${job}.py" "${extra[@]}"
