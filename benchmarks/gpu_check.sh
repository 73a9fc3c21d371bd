#!/usr/bin/env bash
# The one prepared run for a lent single GPU. The image has PyTorch, Triton, lightning, pytest(-xdist) and
# tensorboard, but no NeMo, megatron-core, Lhotse, hydra or Transformer Engine (so the local layer spec runs):
#   1. install the carried wheels (.whl/) into /tmp/site;
#   2. the single-process tests in the background (SIGINT at the limit, so pytest still prints its report); meanwhile
#      conf/jstip_gpu_1b.yaml's model (random weights, bf16-mixed, the carried corpus) trains through
#      examples/jstip_train.py to step 20 (checkpoint), the same command with max_steps=30 resumes to step 30 and
#      writes a .nemo, and examples/jstip_eval.py decodes a few utterances with it;
#   3. benchmarks/bench_gpu.py alone on the GPU: 8 x 2048 and 2 x 2048, as they are and with --foreach --compile;
#   4. OUT/gpu_check.json, shaped as docs/perf/gpu_check.json (mfu is a fraction of the dense BF16 peak).
# OUT gets 7 files: gpu_check.json env.txt pytest.log train.log eval.json bench.log bench.json.
#
#   bash benchmarks/gpu_check.sh OUT [--only tests,train,eval,bench]  # GPU machine; carry .whl data/gpu_corpus .gpu
#   bash benchmarks/gpu_check.sh OUT --dry-run                        # every step at tiny size on the CPU
#   bash benchmarks/gpu_check.sh OUT --record-only                    # step 4 alone, from an earlier run's WORK
#   bash benchmarks/gpu_check.sh --prepare                            # here (network): wheels, espeak, corpus
# Env: PY (python; python3, .venv's in a dry run), GPU_CHECK_COMMIT (the commit to record: the device's copy has no .git),
# GPU_CHECK_WORK (scratch: checkpoints and the .nemo, ~35 GB on the GPU; /tmp/gpu_check), GPU_CHECK_XDIST (pytest -n).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
CORPUS=data/gpu_corpus
# One version of each: what `import nemo.collections.asr, megatron.core, lhotse, nemo_jstip` loads and the image
# lacks (KINDS.md's package list), as resolved in .venv; lightning is the image's too, but NeMo pins <= 2.4.0.
WHEELS=(megatron-core==0.19.2 nemo_toolkit==3.0.0 lhotse==1.33.0 lightning==2.4.0 hydra-core==1.3.2 omegaconf==2.3.0
  num2words==0.5.14 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 webdataset==1.0.2 braceexpand==0.1.7
  soundfile==0.14.0 cffi==2.1.1 librosa==1.0.1 decorator==5.3.1 intervaltree==3.2.1 cytoolz==1.2.0 kaldialign==0.12.0
  pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 nv-one-logger-core==2.3.1
  nv-one-logger-training-telemetry==2.3.1 nv-one-logger-pytorch-lightning-integration==2.3.1 StrEnum==0.4.15
  overrides==7.7.0 toml==0.10.2 pycparser==3.12 audioread==3.1.0 pooch==1.9.0 platformdirs==4.14.9 soxr==1.1.0
  aistore==2.0.0 msgspec==0.23.0 tenacity==9.2.1 smart_open==9.0.4 text-unidecode==1.3
  whisper-normalizer==0.1.15 more-itertools==11.2.1 indic-numtowords==1.1.0 text2num==3.1.0)
SDISTS=(antlr4-python3-runtime==4.9.3 docopt==0.6.2)  # no wheels on PyPI: built here (pure Python)

prepare() {
  set -e
  local py=${PY:-.venv/bin/python}
  for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  rm -rf .whl && mkdir -p .whl
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  $py -m pip wheel -q --no-deps -w .whl "${SDISTS[@]}"
  # espeak-ng for the tests' tiny corpus (tests/conftest.py synthesises it): the library, libsonic, a stub for
  # libpcaudio (linked, never called: synthesis is synchronous, to memory) and the English data only.
  rm -rf .gpu && mkdir -p .gpu/lib .gpu/espeak-ng-data
  cp -L /lib/x86_64-linux-gnu/libespeak-ng.so.1 /lib/x86_64-linux-gnu/libsonic.so.0 .gpu/lib/
  cat > .gpu/pcaudio_stub.c <<'C'
#include <stddef.h>
void *create_audio_device_object(const char *d, const char *a, const char *n) { return NULL; }
int audio_object_open(void *o, int f, unsigned r, unsigned c) { return -1; }
void audio_object_close(void *o) {}
void audio_object_destroy(void *o) {}
int audio_object_write(void *o, const void *d, size_t n) { return -1; }
int audio_object_drain(void *o) { return -1; }
int audio_object_flush(void *o) { return -1; }
const char *audio_object_strerror(void *o, int e) { return "no audio device"; }
C
  gcc -shared -fPIC -O2 -Wl,-soname,libpcaudio.so.0 -o .gpu/lib/libpcaudio.so.0 .gpu/pcaudio_stub.c
  local data=/usr/lib/x86_64-linux-gnu/espeak-ng-data
  cp -r $data/{phontab,phonindex,phondata,phondata-manifest,intonations,en_dict,lang,voices} .gpu/espeak-ng-data/
  # the GPU run's corpus: a few MB (manifests hold absolute paths; the run rewrites them to its checkout)
  rm -rf $CORPUS
  $py -m nemo_jstip.prep.corpus out_dir=$CORPUS sizes.general_train=32 sizes.general_words=16 sizes.general_dev=4 \
    sizes.general_test=6 sizes.medical_text=200 sizes.banking_text=200 sizes.medical_dev=0 sizes.banking_dev=0 \
    sizes.medical_test=4 sizes.banking_test=4 sizes.qa_test=0
  $py -m nemo_jstip.prep.tokenizer corpus_dir=$CORPUS
  du -sh .whl .gpu $CORPUS
}

if [ "${1:-}" = --prepare ]; then prepare; exit; fi
OUT=${1:?usage: gpu_check.sh OUT [--dry-run] [--only tests,train,eval,bench] | gpu_check.sh --prepare}
shift
DRY=0 ONLY=tests,train,eval,bench RECORD_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --record-only) RECORD_ONLY=1 ONLY=none ;;
    --only) ONLY=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[ $DRY = 1 ] && [ -z "${PY:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # here python3 may be 3.11
PY=${PY:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
[ $RECORD_ONLY = 1 ] || rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HYDRA_FULL_ERROR=1

# Every step under its own limit (seconds); name, exit status and duration go to steps.tsv. GPU budget: <= 8 min.
# Critical path: install ~20, train 115 + resume 100 + eval 50 (tests beside them: 245), bench 75 + 110, record ~10.
if [ $DRY = 1 ]; then
  T_TESTS=600 T_TRAIN1=300 T_TRAIN2=300 T_EVAL=200 T_BENCH=300 T_BENCH_FAST=400
else
  T_TESTS=${T_TESTS:-245} T_TRAIN1=${T_TRAIN1:-240} T_TRAIN2=${T_TRAIN2:-200} T_EVAL=${T_EVAL:-50} T_BENCH=${T_BENCH:-75}
  T_BENCH_FAST=${T_BENCH_FAST:-110}
fi
step() {  # step NAME LIMIT [timeout options --] CMD...
  local name=$1 limit=$2 t0=$SECONDS opts=(-k 20); shift 2
  if [ "$1" = -s ]; then opts+=(-s "$2"); shift 3; fi
  timeout "${opts[@]}" "$limit" "$@"
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$WORK/steps.tsv"
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s (limit $limit)"
  return $rc
}

# 1. wheels (absent where the environment has the packages already, e.g. .venv)
t0=$SECONDS
if [ $RECORD_ONLY = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" | tee "$OUT/env.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
# espeak-ng for the tests' corpus (carried libraries and data; ours first if the image had its own)
if [ -d .gpu/lib ]; then
  export LD_LIBRARY_PATH=$ROOT/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ESPEAK_DATA_PATH=$ROOT/.gpu
fi
# the corpus manifests name their audio by absolute path, as built: point them at this checkout
if [ $RECORD_ONLY = 1 ]; then :
elif [ -f $CORPUS/corpus.json ]; then
  built=$($PY -c "import json; print(json.load(open('$CORPUS/corpus.json'))['config']['out_dir'])")
  [ "$built" != "$ROOT/$CORPUS" ] && sed -i "s#$built/#$ROOT/$CORPUS/#g" $CORPUS/*_cuts.jsonl
elif [ "$ONLY" != none ]; then
  echo "no $CORPUS: run benchmarks/gpu_check.sh --prepare where there is a network, and carry it" >&2
fi
[ $RECORD_ONLY = 0 ] && { echo "install: $((SECONDS - t0)) s; dry run: $DRY; $(date -u +%FT%TZ); $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  $PY -c "import torch, megatron.core, nemo, lhotse, lightning, transformers; print('torch', torch.__version__,
  'cuda', torch.version.cuda, '| mcore', megatron.core.__version__, '| nemo', nemo.__version__, '| lhotse',
  lhotse.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
  $PY -m pip list 2>/dev/null |
    grep -iE "^(torch|triton|numpy|pyarrow|fsspec|huggingface.hub|pytest.*|tensorboard|peft|pandas|transformers) "
} > "$OUT/env.txt" 2>&1 && cat "$OUT/env.txt"

# 2a. single-process tests in the background. Multi-rank tests need one GPU per rank under NCCL: deselected.
MULTI="tp2 or data_parallel or context_parallel or model_parallel_matches or distributed_optimizer or kv_cache \
or rows_do_not or eos_stops or tensor_parallel_run"
if [ $DRY = 1 ]; then  # the script's logic, not the suite: one test file that builds the corpus with the carried espeak
  TESTS=(tests/models/test_jstip_model.py)
else  # test_overfit: train + exact greedy decode on the GPU. tests/test_resume.py (CPU subprocess training) is left out
  TESTS=(tests/models/test_overfit.py tests/modules tests/models)
fi
PLUGINS=()  # the image has pytest-timeout and pytest-xdist (2 workers: ~2x, and beside the training); .venv may not
$PY -c "import pytest_timeout" 2>/dev/null && PLUGINS+=(--timeout 200)
XDIST=${GPU_CHECK_XDIST:-$((DRY ? 0 : 2))}
[ "$XDIST" -gt 0 ] && $PY -c "import xdist" 2>/dev/null && PLUGINS+=(-n "$XDIST" --dist loadfile)
if wants tests; then
  step tests $T_TESTS -s INT -- $PY -m pytest -q -rfE -p no:cacheprovider "${PLUGINS[@]}" "${TESTS[@]}" \
    -k "not ($MULTI)" --deselect "tests/modules/test_hf_import.py::test_logit_parity_with_hf[2]" \
    --junitxml="$WORK/junit.xml" > "$OUT/pytest.log" 2>&1 &
  TESTS_PID=$!
fi

# 2b. the 1B recipe: random weights (no pretrained paths), the corpus' tokenizer (llm.vocab_size stays 128256),
# validation off; the checkpoint at step 20 is the only one (save_top_k 0 + save_last; val_check_interval 10 keeps
# NeMo from saving another "last" at train end): ~16 GB each with the Adam state.
# Without the pretrained files, the shapes they would give are stated: Llama-3.2-1B's, FastConformer-L's.
SHAPES=(++model.llm.num_layers=16 ++model.llm.hidden_size=2048 ++model.llm.ffn_hidden_size=8192
  ++model.llm.num_attention_heads=32 ++model.llm.num_query_groups=8 ++model.llm.kv_channels=64
  ++model.llm.vocab_size=128256 ++model.llm.rotary_base=500000.0 ++model.llm.rope_scaling=true
  ++model.llm.rope_scaling_factor=32.0 ++model.llm.tie_embeddings=true
  "++model.perception.preprocessor={sample_rate:16000,features:80,window_size:0.025,window_stride:0.01,n_fft:512,window:hann,normalize:per_feature,log:true,frame_splicing:1,dither:1.0e-5,pad_to:0}"
  "++model.perception.encoder={feat_in:80,n_layers:17,d_model:512,n_heads:8,subsampling:dw_striding,subsampling_factor:8,subsampling_conv_channels:256,ff_expansion_factor:4,self_attention_model:rel_pos,xscaling:true,untie_biases:true,conv_kernel_size:9,conv_norm_type:batch_norm,dropout:0.1,dropout_pre_encoder:0.1,dropout_emb:0.0,dropout_att:0.1}")
TRAIN=(examples/jstip_train.py --config-name jstip_gpu_1b data.corpus_dir=$CORPUS pretrained.asr_nemo=null
  pretrained.hf_llm=null "${SHAPES[@]}" model.tokenizer.path=$CORPUS/tokenizer trainer.devices=1 trainer.log_every_n_steps=1
  trainer.limit_val_batches=0 trainer.val_check_interval=10 exp_manager.exp_dir=$WORK/exp model_out=$WORK/1b.nemo
  exp_manager.checkpoint_callback_params.every_n_train_steps=20 exp_manager.checkpoint_callback_params.save_top_k=0
  model.optim.sched.warmup_steps=5 model.num_microbatches=2)
STEPS1=20 STEPS2=30
if [ $DRY = 1 ]; then
  STEPS1=2 STEPS2=3
  TRAIN+=(trainer.accelerator=cpu trainer.precision=32 exp_manager.checkpoint_callback_params.every_n_train_steps=2
    trainer.val_check_interval=1 model.llm.num_layers=2 model.llm.hidden_size=64 model.llm.ffn_hidden_size=128
    model.llm.num_attention_heads=4 model.llm.num_query_groups=2 model.llm.kv_channels=16 model.llm.vocab_size=1024
    model.perception.encoder.n_layers=2 model.perception.encoder.d_model=64 model.perception.encoder.n_heads=4
    model.perception.encoder.subsampling_conv_channels=64 model.perception.adapter.hidden_size=64
    model.train_ds.sampler.max_tokens=1024 model.train_ds.sampler.max_item_cost=512 model.train_ds.loader.num_workers=1
    model.num_microbatches=1)
fi
# the same command both times; the wrapper prints the process' peak GPU memory at exit
PEAK='import atexit, runpy, sys, torch
atexit.register(lambda: torch.cuda.is_available()
                and print(f"PEAK_MEM_GIB {torch.cuda.max_memory_allocated() / 2**30:.2f}"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")'
if wants train; then
  : > "$OUT/train.log"
  # the resume only after a complete first run (else it would start again from scratch)
  step train_to_$STEPS1 $T_TRAIN1 $PY -c "$PEAK" "${TRAIN[@]}" trainer.max_steps=$STEPS1 >> "$OUT/train.log" 2>&1 &&
    step train_resume_to_$STEPS2 $T_TRAIN2 $PY -c "$PEAK" "${TRAIN[@]}" trainer.max_steps=$STEPS2 \
      >> "$OUT/train.log" 2>&1
  grep -E "Resuming training from|PEAK_MEM_GIB|Error|error:" "$OUT/train.log" | tail -8
fi

# 2c. GPU generation with the trained .nemo on a few utterances
if wants eval && [ -f "$WORK/1b.nemo" ]; then
  head -n 4 $CORPUS/general_test_cuts.jsonl > "$WORK/eval_cuts.jsonl"
  head -n 2 $CORPUS/medical_test_cuts.jsonl >> "$WORK/eval_cuts.jsonl"
  [ $DRY = 1 ] && head -n 2 "$WORK/eval_cuts.jsonl" > "$WORK/e" && mv "$WORK/e" "$WORK/eval_cuts.jsonl"
  step eval $T_EVAL $PY examples/jstip_eval.py model=$WORK/1b.nemo data.manifest=$WORK/eval_cuts.jsonl \
    output_dir=$WORK/eval max_new_tokens=24 name=jstip_gpu_1b_random >> "$OUT/train.log" 2>&1
fi
if [ -n "${TESTS_PID:-}" ]; then wait $TESTS_PID; tail -15 "$OUT/pytest.log"; fi
wants train && rm -rf "$WORK"/exp/*/checkpoints  # ~16 GB; the bench wants the page cache

# 3. throughput, alone on the GPU: LLM-side MFU at 8 x 2048 (and 16 x 2048), and the host-bound small batch
if wants bench; then
  B=(benchmarks/bench_gpu.py) PLAIN=(--steps 8 --warmup 2) FAST=(--steps 10 --warmup 3)
  [ $DRY = 1 ] && B+=(--device cpu --tiny) PLAIN=(--steps 2 --warmup 1) FAST=(--steps 2 --warmup 2)
  step bench $T_BENCH $PY "${B[@]}" "${PLAIN[@]}" --configs local-bf16-params,local-bf16-autocast --batch 8,2,16 \
    --out "$WORK/bench_1_plain.json" > "$OUT/bench.log" 2>&1
  # compiled: 3 warmup steps hold the compilation (one per layer type and shape); recompiles are logged
  step bench_fast $T_BENCH_FAST env TORCH_LOGS=recompiles $PY "${B[@]}" "${FAST[@]}" --configs local-bf16-params \
    --batch 8,2 --foreach --compile --out "$WORK/bench_2_fast.json" >> "$OUT/bench.log" 2>&1
  grep -E "^\[(done|skip)\]" "$OUT/bench.log"
fi

# 4. the record
OUT=$OUT WORK=$WORK DRY=$DRY STEPS1=$STEPS1 $PY - <<'EOF'
import datetime, glob, json, os, re, subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

out, work = Path(os.environ["OUT"]), Path(os.environ["WORK"])
rec = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
try:
    import torch
    rec["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rec["torch"] = torch.__version__
except Exception as e:  # noqa: BLE001
    rec["device"] = f"unknown ({e})"
rec["commit"] = os.environ.get("GPU_CHECK_COMMIT") or subprocess.run(
    ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
rec["dry_run"] = os.environ["DRY"] == "1"
rec["mfu_unit"] = "fraction of the dense BF16 peak (LLM FLOPs only; bench_gpu.py)"

# tests: junit XML (pytest writes it on SIGINT too), else the summary line of the log
tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": [], "interrupted": False}
log = (out / "pytest.log").read_text(errors="replace") if (out / "pytest.log").exists() else ""
tests["interrupted"] = "KeyboardInterrupt" in log
if (work / "junit.xml").exists():
    for case in ET.parse(work / "junit.xml").getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "errors"}.get(kind, kind)
        tests[key] += 1
        if key in ("failed", "errors"):
            tests["failed_ids"].append(f"{case.get('classname')}::{case.get('name')}")
elif log:
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", log.splitlines()[-1] if log else ""):
        tests["errors" if what.startswith("error") else what] = int(n)
    tests["failed_ids"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
rec["tests"] = tests

# bench: every measured configuration of both runs
bench, raw = [], []
for f in sorted(glob.glob(str(work / "bench_*.json"))):
    d = json.load(open(f))
    raw.append(d)
    for r in d["results"]:
        if "skipped" in r:
            bench.append({"config": r["config"], "skipped": r["skipped"]})
        else:
            bench.append({"config": r["label"], "step_ms": round(r["step_ms"], 1),
                          "tokens_per_s": round(r["tokens_per_s"]),
                          "mfu": None if r["mfu"] is None else round(r["mfu"], 4),
                          "peak_mem_gib": None if r["peak_mem_gib"] is None else round(r["peak_mem_gib"], 2),
                          "tflops_per_s": round(r["tflops_per_s"], 1), "warmup_s": round(r["warmup_s"], 1)})
rec["bench"] = bench
(out / "bench.json").write_text(json.dumps(raw, indent=1))

# train_1b: train_loss per step from the runs' TensorBoard files (one per run, oldest first)
train = {"steps": 0, "resumed": False, "loss_first": None, "loss_last": None}
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for f in sorted(work.glob("exp/**/events.out.tfevents*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train_loss" in acc.Tags()["scalars"]:
            runs.append({e.step: (e.value, e.wall_time) for e in acc.Scalars("train_loss")})
    if runs:
        steps = sorted({s for r in runs for s in r})
        train["steps"] = steps[-1] + 1
        train["resumed"] = len(runs) >= 2 and min(runs[-1]) == int(os.environ["STEPS1"]) and min(runs[0]) == 0
        train["loss_first"] = round(runs[0][min(runs[0])][0], 4)
        train["loss_last"] = round(runs[-1][max(runs[-1])][0], 4)
        train["steps_per_run"] = [[min(r), max(r)] for r in runs]
        walls = sorted(b[1] - a[1] for r in runs for s, a in r.items() if (b := r.get(s + 1)))
        train["step_s_median"] = round(walls[len(walls) // 2], 3) if walls else None
except Exception as e:  # noqa: BLE001
    train["error"] = f"{type(e).__name__}: {e}"
train_log = out / "train.log"
peaks = re.findall(r"PEAK_MEM_GIB ([\d.]+)", train_log.read_text(errors="replace") if train_log.exists() else "")
train["peak_mem_gib"] = max(map(float, peaks)) if peaks else None
rec["train_1b"] = train

# eval: the metrics and a few hypotheses (random weights: the text is noise; the check is that generation runs)
ev = {}
if (work / "eval/metrics.json").exists():
    ev["metrics"] = json.load(open(work / "eval/metrics.json"))
    ev["hypotheses"] = [json.loads(line) for line in open(work / "eval/hypotheses.jsonl")][:4]
(out / "eval.json").write_text(json.dumps(ev, indent=1))
rec["eval"] = {k: ev.get("metrics", {}).get(k) for k in ("num_utterances", "wer", "rtfx")}

rec["steps"] = {}
if (work / "steps.tsv").exists():
    for line in open(work / "steps.tsv"):
        name, rc, s = line.split("\t")
        rec["steps"][name] = {"exit": int(rc), "seconds": int(s)}
(out / "gpu_check.json").write_text(json.dumps(rec, indent=1))
print(json.dumps({k: rec[k] for k in ("device", "tests", "train_1b", "eval", "steps")}, indent=1))
for b in bench:
    print(f"{b['config']}: {b.get('step_ms')} ms, mfu {b.get('mfu')}, {b.get('peak_mem_gib')} GiB",
          b.get("skipped", ""))
EOF
