#!/usr/bin/env bash
# Reproduces every table and plot in docs/results.md (measured on a 2-core CPU machine; see the times there).
# Usage: LIGHTNING_FED_DATA=/path/to/data bash benchmarks/results.sh [study_a|heart|study_b|sweeps|reuse|study_c|study_c_rules|study_c_epistemic|study_c_holdout|study_c_fit|wire_study_b|wire_ct|privacy_dp]...
set -euo pipefail
out=${OUT:-docs/results}
quiet=(--trainer.logger=false)   # per-run CSV/W&B logs off: the tables, plots and results.json are the record
ratios=0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5
ct_metrics=dice,dice_canon,dice_ge,dice_philips,dice_siemens,mutual_information
run() { echo "+ $*"; "$@"; }
# every codec against full updates: fp16, int8 (a scale per 256 values), top-k 10 % and 1 % (error feedback)
codecs=(--zip "trainer.strategy.init_args.compression=null,fp16,int8,topk,topk"
        --zip "trainer.strategy.init_args.compression_kwargs=null,null,null,{fraction: 0.1},{fraction: 0.01}")
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
  study_c)
    # simulated multi-vendor CT: local, pooled and FedAvg, Dice per hospital and per vendor, 3 repetitions
    run lightning-fed compare --config recipes/ct_vendors.yaml --repeats 3 --modes local,pooled,federated \
      --metrics "$ct_metrics" --out "$out/study_c" "${quiet[@]}" ;;
  study_c_rules)
    # the federated rules side by side (each its own compare, same seeds), then three hospitals without labels
    for rule in fedbn uncertainty_weighted fiva; do
      run lightning-fed compare --config recipes/ct_vendors.yaml --repeats 3 --modes federated --metrics "$ct_metrics" \
        --trainer.strategy.init_args.aggregator=$rule --out "$out/study_c_$rule" "${quiet[@]}"
    done
    for rule in fedavg uncertainty_weighted; do
      run lightning-fed compare --config recipes/ct_vendors.yaml --repeats 3 --modes federated --metrics "$ct_metrics" \
        --trainer.strategy.init_args.aggregator=$rule "--data.init_args.unlabelled=[C,G,J]" \
        --out "$out/study_c_unlabelled_$rule" "${quiet[@]}"
    done ;;
  study_c_epistemic)
    # uncertainty weighting by the global model's epistemic uncertainty only (no local aleatoric term), three unlabelled
    run lightning-fed compare --config recipes/ct_vendors.yaml --repeats 3 --modes federated --metrics "$ct_metrics" \
      --trainer.strategy.init_args.aggregator=uncertainty_weighted "--trainer.strategy.init_args.aggregator_kwargs={score: epistemic}" \
      "--data.init_args.unlabelled=[C,G,J]" --out "$out/study_c_unlabelled_epistemic" "${quiet[@]}" ;;
  study_c_fit)
    # one fit with the shift report and the per-round weights (FedEvi score, three hospitals unlabelled)
    run lightning-fed fit --config recipes/ct_vendors.yaml --trainer.strategy.init_args.aggregator=uncertainty_weighted \
      "--data.init_args.unlabelled=[C,G,J]" --trainer.logger=false --trainer.default_root_dir=runs/study_c_fit
    mkdir -p "$out/study_c_fit"
    cp runs/study_c_fit/{results.json,shift_report.csv,shift_report.png,aggregation_weights.png} "$out/study_c_fit/"
    cp runs/study_c_fit/sites/G/overlays/test.png "$out/study_c_fit/overlays_G.png" ;;
  wire_study_b)
    # accuracy against the bytes a site sends per round, for each codec: study B, then the CT recipe
    run lightning-fed sweep --config recipes/hospitals.yaml --repeats 2 --modes federated --metrics recall,precision,auroc \
      "${codecs[@]}" --out "$out/wire_study_b" "${quiet[@]}" ;;
  wire_ct)
    run lightning-fed sweep --config recipes/ct_vendors.yaml --repeats 2 --modes federated --metrics dice,mutual_information \
      "${codecs[@]}" --out "$out/wire_ct" "${quiet[@]}" ;;
  privacy_dp)
    # study B's last DP experiment: DP on every hospital vs the large hospital alone with DP, same ε grid; then the
    # PRV accountant on every hospital (its noise calibrated for the same ε)
    run python benchmarks/privacy.py --arms all large --epsilons 0.5 1 2 4 8 --json "$out/privacy_dp/results.json" \
      --png "$out/privacy_dp/federated_vs_large_alone.png" --title "Study B: federated + DP vs the large hospital alone + DP"
    run python benchmarks/privacy.py --arms all --accountant prv --epsilons 0.5 1 2 4 8 --json "$out/privacy_dp/results.json" \
      --png "$out/privacy_dp/rdp_vs_prv.png" --title "Study B, DP on every hospital: RDP vs PRV accountant" ;;
  study_c_holdout)
    # hospitals the models never saw: E (CANON only), G (a quarter SIEMENS), J (half PHILIPS), each held out in turn
    for rule in fedavg uncertainty_weighted; do
      run lightning-fed compare --config recipes/ct_vendors.yaml --repeats 3 --modes "$([ $rule = fedavg ] && echo pooled,federated || echo federated)" \
        --holdout E,G,J --metrics dice,mutual_information --trainer.strategy.init_args.aggregator=$rule \
        --out "$out/study_c_holdout_$rule" "${quiet[@]}"
    done ;;
  *) echo "unknown part $p (study_a, heart, study_b, sweeps, reuse, study_c, study_c_rules, study_c_epistemic, study_c_holdout, study_c_fit)"; exit 2 ;;
esac; done; done
