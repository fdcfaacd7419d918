#!/usr/bin/env bash
# The test suite: repository checks, every notebook under nbdev_test, and pytest, then the driver's smoke setting.
# `bash .ci/test.sh fast` is the fast tier (`make test-fast`): the checks, the library notebooks (nbs/0*.ipynb, their
# examples and asserts) and the tests not marked slow; no papermill runs of the entry or paper notebooks.
# Ends with one line "total: N passed, M failed[, K skipped]"; exits non-zero on any failure.
set -uo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=.ci/out; mkdir -p "$OUT"
passed=0; failed=0; skipped=0
ok()   { passed=$((passed + 1)); echo "PASS  $1"; }
bad()  { failed=$((failed + 1)); echo "FAIL  $1"; }

echo "== checks"
# 1. nbdev_export must not change wat_nb/ (the notebooks are the source).
snap=$(mktemp -d); cp -r wat_nb "$snap/"
if "$BIN/nbdev_export" >"$OUT/export.log" 2>&1 && diff -r -x __pycache__ "$snap/wat_nb" wat_nb >"$OUT/export.diff"; then
  ok "nbdev_export leaves wat_nb/ unchanged"
else
  bad "nbdev_export changes wat_nb/ (see $OUT/export.diff); export and commit"; head -20 "$OUT/export.diff"
  rm -rf wat_nb; cp -r "$snap/wat_nb" wat_nb
fi
rm -rf "$snap"
# 2. Notebooks are committed without outputs or execution counts, with a python3 kernelspec (papermill needs it).
if "$BIN/python" - <<'PY'
import json, subprocess, sys
files = subprocess.run(["git", "ls-files", "nbs/*.ipynb", "nbs/**/*.ipynb"], capture_output=True, text=True).stdout.split()
bad = []
for f in files:
    nb = json.load(open(f))
    if nb.get("metadata", {}).get("kernelspec", {}).get("name") != "python3": bad.append(f"{f}: kernelspec is not python3")
    for c in nb["cells"]:
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None):
            bad.append(f"{f}: has outputs or execution counts (run nbdev_clean)"); break
if bad: print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
then ok "notebooks are clean"; else bad "notebooks carry outputs"; fi
# 3. pyflakes finds nothing in the library, the tests or the benchmarks (no undefined names, no unused imports).
if "$BIN/pyflakes" wat_nb tests benchmarks docs >"$OUT/pyflakes.log" 2>&1; then
  ok "pyflakes: wat_nb/, tests/, benchmarks/, docs/ are clean"
else
  bad "pyflakes found problems (see $OUT/pyflakes.log)"; head -20 "$OUT/pyflakes.log"
fi

# one thread per process: nbdev_test and pytest each run two at once on this 2-core machine
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== nbdev_test"
if [ "$MODE" = fast ]; then
  mapfile -t nbs < <(find nbs -maxdepth 1 -name '0*.ipynb' | sort); sel=(--file_re '^0' --folder_re '^$')
else
  mapfile -t nbs < <(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -not -name '_*' | sort); sel=()
fi
timeout 1500 "$BIN/nbdev_test" --n_workers 2 --timing --do_print "${sel[@]}" >"$OUT/nbdev_test.log" 2>&1
nb_rc=$?
cat "$OUT/nbdev_test.log" | grep -v "^Starting\|^- Completed" | tail -60
nb_failed=$(awk '/nbdev Tests Failed On The Following Notebooks/{f=1; next} f && /\.ipynb/{n++} END{print n+0}' "$OUT/nbdev_test.log")
if [ "$nb_rc" -ne 0 ] && [ "$nb_failed" -eq 0 ]; then nb_failed=${#nbs[@]}; fi   # crashed or timed out
passed=$((passed + ${#nbs[@]} - nb_failed)); failed=$((failed + nb_failed))
echo "notebooks: $(( ${#nbs[@]} - nb_failed )) passed, $nb_failed failed"

echo "== pytest"
marks=(); [ "$MODE" = fast ] && marks=(-m "not slow")
# two workers (pytest-xdist), a test file stays on one worker so its module fixtures are built once
LAB_CHECK_OUT=$OUT/lab "$BIN/python" -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --durations=5 "${marks[@]}" --junitxml="$OUT/pytest.xml"
read -r p f s < <("$BIN/python" - <<'PY'
import xml.etree.ElementTree as ET
try:
    r = ET.parse(".ci/out/pytest.xml").getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    t, f, e, k = (int(s.get(x, 0)) for x in ("tests", "failures", "errors", "skipped"))
    print(t - f - e - k, f + e, k)
except Exception:
    print(0, 1, 0)
PY
)
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))

if [ "$MODE" = fast ]; then
  echo "total: $passed passed, $failed failed, $skipped skipped"
  [ "$failed" -eq 0 ]; exit
fi

echo "== reproduction driver, smoke setting (every experiment and paper notebook on tiny settings)"
rm -rf runs/smoke
if OMP_NUM_THREADS=1 timeout 1200 "$BIN/python" -m wat_nb.reproduce --smoke --jobs 2 >"$OUT/smoke.log" 2>&1; then
  tail -2 "$OUT/smoke.log"
  if OMP_NUM_THREADS=1 timeout 120 "$BIN/python" -m wat_nb.reproduce --smoke >"$OUT/smoke2.log" 2>&1 && grep -q "reproduce: 0 done, .* 0 failed" "$OUT/smoke2.log"; then
    ok "make reproduce --smoke runs every step, and a second run redoes nothing"
  else
    bad "the second smoke run redid work (see $OUT/smoke2.log)"; tail -5 "$OUT/smoke2.log"
  fi
else
  bad "make reproduce --smoke failed (see $OUT/smoke.log)"; tail -20 "$OUT/smoke.log"
fi

echo "total: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
