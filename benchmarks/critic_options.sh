#!/usr/bin/env bash
# The policy and critic options (README, "Policy and critic options") on reach-v3 at the parity
# settings, two runs at a time, one torch thread each (benchmarks/parity_sac.py, project side).
#
#     bash benchmarks/critic_options.sh                    # seed 0 (the seed that diverged), every option
#     bash benchmarks/critic_options.sh 1 2 3 4 -- loss.clip_td_target=true network.critic_layer_norm=true
#     bash benchmarks/critic_options.sh 0 -- buffer.kind=stratified_prioritized+loss.clip_td_target=true
#
# Arguments before `--` are seeds (default 0); after it, the options to run, one run folder
# each, `+` joining overrides that go together (default: every option, and per-task uniform
# replay alone as baseline). Every run samples per-task uniform (buffer.kind=stratified)
# unless its option names a buffer.kind. An option's runs go to
# benchmarks/runs/parity/options_reach-v3_<name>, <name> the last part of each key (for
# buffer.kind, the replay kind's own name).
# The same command skips finished runs and continues interrupted ones from their last
# checkpoint; an option's log is <folder>/log.txt. Then, one row per run:
#     python benchmarks/parity_sac.py --seeds 0 1 2 3 4 --table benchmarks/runs/parity/options_reach-v3_*
# and an option against the baseline, IQM over seeds with 95% intervals:
#     python benchmarks/parity_sac.py --seeds 0 1 2 3 4 --compare benchmarks/runs/parity/options_reach-v3_<name> \
#         benchmarks/runs/parity/options_reach-v3_stratified --out benchmarks/runs/parity/options_<name>_vs_stratified
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=()
while [[ $# -gt 0 && "$1" != "--" ]]; do seeds+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
options=("$@")
[[ ${#seeds[@]} -eq 0 ]] && seeds=(0)
if [[ ${#options[@]} -eq 0 ]]; then
    options=(loss.clip_td_target=true network.critic_layer_norm=true buffer.kind=stratified
             network.critic_value_bins=101 network.log_prob=reference loss.reward_normalization=true)
fi

run_option() {  # run_option OPTION SEED...: the seeds one after the other
    local overrides name="" part key
    IFS=+ read -r -a overrides <<< "$1"
    shift
    for part in "${overrides[@]}"; do
        key=${part%%=*}
        [[ $key == buffer.kind ]] && key=${part#*=}
        name+=${name:++}${key##*.}
    done
    local out="benchmarks/runs/parity/options_reach-v3_$name"
    mkdir -p "$out"
    python benchmarks/parity_sac.py --seeds "$@" --sides project --project buffer.kind=stratified "${overrides[@]}" --out "$out" >> "$out/log.txt" 2>&1
    echo "$(date -u +%FT%TZ) done: ${overrides[*]} seeds $* -> $out"
}
export -f run_option

printf '%s\n' "${options[@]}" | xargs -P 2 -I {} bash -c 'run_option "$@"' _ {} "${seeds[@]}"
