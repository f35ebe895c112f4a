#!/usr/bin/env bash
# Reproduces every table and plot in docs/results.md (measured on a 2-core CPU machine; see the times there).
# Usage: LIGHTNING_FED_DATA=/path/to/data bash benchmarks/results.sh [study_a|heart|study_b|sweeps|reuse]...
set -euo pipefail
out=${OUT:-docs/results}
quiet=(--trainer.logger=false)   # per-run CSV/W&B logs off: the tables, plots and results.json are the record
ratios=0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5
run() { echo "+ $*"; "$@"; }
for part in "${@:-study_a heart study_b sweeps reuse}"; do for p in $part; do case $p in
  study_a)
    run lightning-fed compare --config recipes/retinamnist.yaml --repeats 6 --out "$out/study_a" "${quiet[@]}"
    run lightning-fed compare --config recipes/retinamnist.yaml --repeats 6 --out "$out/study_a_balanced" \
      --trainer.strategy.init_args.class_balance=loss "${quiet[@]}" ;;
  heart)
    run lightning-fed compare --config recipes/heart_disease.yaml --repeats 6 --out "$out/heart_disease" "${quiet[@]}" ;;
  study_b)
    run lightning-fed compare --config recipes/hospitals.yaml --repeats 3 --out "$out/study_b" "${quiet[@]}" ;;
  sweeps)
    # 2 epochs instead of 10 per run (72 runs on 2 cores); size of the large hospital fixed at 30,000
    run lightning-fed sweep --config recipes/hospitals.yaml --trainer.max_epochs=2 --metrics recall,precision,auroc \
      --grid "data.init_args.positive_ratios[0]=$ratios" --grid "data.init_args.positive_ratios[1:]=0.05,0.1,0.15,0.2" \
      --out "$out/study_b_sweep_size" "${quiet[@]}"
    # its number of abnormal images fixed at 3,000 instead: size = 3000 / ratio
    run lightning-fed sweep --config recipes/hospitals.yaml --trainer.max_epochs=2 --metrics recall,precision,auroc \
      --zip "data.init_args.positive_ratios[0]=$ratios" --zip "data.init_args.sizes[0]=30000,20000,15000,12000,10000,8571,7500,6667,6000" \
      --grid "data.init_args.positive_ratios[1:]=0.05,0.1,0.15,0.2" --x "data.init_args.positive_ratios[0]" \
      --out "$out/study_b_sweep_count" "${quiet[@]}" ;;
  reuse)
    # the same compare with and without warm site processes: the wall-time difference is what reuse saves
    run lightning-fed compare --config recipes/heart_disease.yaml --repeats 3 --out "$out/reuse_warm" "${quiet[@]}"
    run lightning-fed compare --config recipes/heart_disease.yaml --repeats 3 --out "$out/reuse_cold" --no-reuse "${quiet[@]}" ;;
  *) echo "unknown part $p (study_a, heart, study_b, sweeps, reuse)"; exit 2 ;;
esac; done; done
