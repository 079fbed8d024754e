#!/usr/bin/env bash
# Run one qinco2 task on several processes, the data-parallel way:
#
#   scripts/launch.sh [-n NPROC] task=train db=... M=8 output=model.pt
#   scripts/launch.sh -n 8 task=encode model=model.pt db=... output=codes.npz
#
# NPROC defaults to the number of GPUs (one process per GPU, `accelerate launch --multi_gpu`),
# or 2 CPU processes (`torchrun`, gloo backend) on a machine without GPU. A free port is
# picked for the processes' rendezvous, so several jobs can run side by side.
set -euo pipefail

nproc=""
if [[ "${1:-}" == "-n" ]]; then
  nproc="$2"
  shift 2
fi
if [[ $# -eq 0 ]]; then
  echo "usage: scripts/launch.sh [-n NPROC] task=... key=value ..." >&2
  exit 2
fi
python=${PYTHON:-python}
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
port=$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
if [[ "$gpus" -gt 0 && " $* " != *" cpu=true "* ]]; then
  nproc=${nproc:-$gpus}
  multi=()
  [[ "$nproc" -gt 1 ]] && multi=(--multi_gpu)
  exec "$python" -m accelerate.commands.launch "${multi[@]}" --num_processes "$nproc" \
    --main_process_port "$port" --module qinco2 "$@"
fi
nproc=${nproc:-2}
exec "$python" -m torch.distributed.run --nproc_per_node "$nproc" --master_addr 127.0.0.1 \
  --master_port "$port" -m qinco2 "$@"
