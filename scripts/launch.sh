#!/usr/bin/env bash
# Run one qinco2 task on several processes, the data-parallel way:
#
#   scripts/launch.sh [-n NPROC] task=train db=... M=8 output=model.pt
#   scripts/launch.sh -n 8 task=encode model=model.pt db=... output=codes.npz
#
# NPROC defaults to the number of GPUs (one process per GPU, `accelerate launch --multi_gpu`),
# or 2 CPU processes (`torchrun`, gloo backend) on a machine without GPU. A free port is
# picked for the processes' rendezvous, so several jobs can run side by side.
#
# Several machines (docs/multinode.md): run the same command on every machine, with its own
# node rank, the same -n on all of them, and the address of the machine of rank 0:
#
#   scripts/launch.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 -n 8 task=...
#   scripts/launch.sh --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 -n 8 task=...
#
# Options (before the task's key=value arguments):
#   -n, --nproc-per-node N  processes on this machine
#   --nnodes N              number of machines (1)
#   --node-rank R           rank of this machine, 0..N-1 (default $NODE_RANK)
#   --master-addr HOST      address of the machine of rank 0, reachable from all (default $MASTER_ADDR)
#   --master-port P         a free port on that machine, the same on all (default $MASTER_PORT or 29500)
#   --launcher L            auto (accelerate on GPUs, torchrun otherwise), accelerate or torchrun
#   --dry-run               print the launch command instead of running it
set -euo pipefail

usage() {
  echo "usage: scripts/launch.sh [-n NPROC] [--nnodes N --node-rank R --master-addr HOST [--master-port P]]" \
       "[--launcher auto|accelerate|torchrun] [--dry-run] task=... key=value ..." >&2
  exit 2
}
die() {
  echo "scripts/launch.sh: $*" >&2
  exit 2
}
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

nproc="" nnodes=1 node_rank="" master_addr="" master_port="" launcher=auto dry_run=false
while [[ $# -gt 0 && "$1" == -* ]]; do
  opt="$1"
  value=""
  if [[ "$opt" == --*=* ]]; then                 # --opt=value
    value="${opt#*=}"
    opt="${opt%%=*}"
  elif [[ "$opt" != --dry-run && "$opt" != -h && "$opt" != --help && "$opt" != -- ]]; then
    [[ $# -ge 2 ]] || die "$opt needs a value"
    value="$2"
    shift
  fi
  shift
  case "$opt" in
    -n | --nproc-per-node | --nproc_per_node) nproc="$value" ;;
    --nnodes) nnodes="$value" ;;
    --node-rank | --node_rank) node_rank="$value" ;;
    --master-addr | --master_addr) master_addr="$value" ;;
    --master-port | --master_port) master_port="$value" ;;
    --launcher) launcher="$value" ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage ;;
    --) break ;;
    *) die "unknown option $opt" ;;
  esac
done
[[ $# -eq 0 ]] && usage
[[ -z "$nproc" ]] || { is_int "$nproc" && [[ "$nproc" -ge 1 ]]; } || die "-n $nproc: expected a number >= 1"
{ is_int "$nnodes" && [[ "$nnodes" -ge 1 ]]; } || die "--nnodes $nnodes: expected a number >= 1"
[[ "$launcher" =~ ^(auto|accelerate|torchrun)$ ]] || die "--launcher $launcher: expected auto, accelerate or torchrun"

if [[ "$nnodes" -gt 1 ]]; then
  node_rank=${node_rank:-${NODE_RANK:-}}
  master_addr=${master_addr:-${MASTER_ADDR:-}}
  master_port=${master_port:-${MASTER_PORT:-29500}}
  [[ -n "$node_rank" ]] || die "--nnodes $nnodes needs --node-rank (0 on the machine at --master-addr)"
  { is_int "$node_rank" && [[ "$node_rank" -lt "$nnodes" ]]; } ||
    die "--node-rank $node_rank: expected 0..$((nnodes - 1))"
  [[ -n "$master_addr" ]] || die "--nnodes $nnodes needs --master-addr (the machine of node rank 0)"
  [[ "$master_addr" == 127.* || "$master_addr" == localhost ]] &&
    echo "scripts/launch.sh: note: --master-addr $master_addr only reaches this machine" >&2
elif [[ -n "$node_rank" && "$node_rank" != 0 ]]; then
  die "--node-rank $node_rank without --nnodes"
fi
if [[ -n "$master_port" ]]; then
  { is_int "$master_port" && [[ "$master_port" -ge 1 && "$master_port" -le 65535 ]]; } ||
    die "--master-port $master_port: expected a port number"
fi

python=${PYTHON:-python}
gpus=0
if [[ "$launcher" == auto || -z "$nproc" ]]; then  # importing torch takes a few seconds
  gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
fi
if [[ -z "$master_port" ]]; then               # one machine: any free port
  master_port=$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi
if [[ "$launcher" == auto ]]; then
  launcher=torchrun
  [[ "$gpus" -gt 0 && " $* " != *" cpu=true "* ]] && launcher=accelerate
fi

if [[ "$launcher" == accelerate ]]; then
  nproc=${nproc:-$((gpus > 0 ? gpus : 1))}
  multi=()
  [[ $((nproc * nnodes)) -gt 1 ]] && multi=(--multi_gpu)
  nodes=()
  [[ "$nnodes" -gt 1 ]] && nodes=(--num_machines "$nnodes" --machine_rank "$node_rank" --main_process_ip "$master_addr")
  # accelerate's --num_processes counts the processes of all machines
  cmd=("$python" -m accelerate.commands.launch "${multi[@]}" "${nodes[@]}" --num_processes $((nproc * nnodes))
       --main_process_port "$master_port" --module qinco2 "$@")
else
  if [[ -z "$nproc" ]]; then                   # one process per GPU, or 2 on the CPU
    nproc=2
    [[ "$gpus" -gt 0 && " $* " != *" cpu=true "* ]] && nproc=$gpus
  fi
  nodes=(--master_addr "${master_addr:-127.0.0.1}")
  [[ "$nnodes" -gt 1 ]] && nodes=(--nnodes "$nnodes" --node_rank "$node_rank" --master_addr "$master_addr")
  cmd=("$python" -m torch.distributed.run "${nodes[@]}" --nproc_per_node "$nproc" --master_port "$master_port"
       -m qinco2 "$@")
fi
if $dry_run; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
