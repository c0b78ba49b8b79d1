#!/usr/bin/env bash
# Mutation testing (mutmut 3) of one fidelity module against the test files that own it.
#   tools/mutation.sh verbalization|processing|generation|decoding [max-children]
# Prints mutmut's summary and writes the surviving mutants to mutants/survivors-<module>.txt.
# Slow (minutes to an hour): not part of CI. Use `mutmut show <name>` to read a mutant.
# pyproject.toml [tool.mutmut] lists every candidate test file; this script narrows the run to the module's own
# files (MUTATION_TESTS overrides, e.g. MUTATION_TESTS="test_generation.py test_decoding.py") with a pytest -k filter
# in PYTEST_ADDOPTS: mutmut's stats and clean-test phases run the whole selection, and the slow end-to-end files
# (test_engine.py, test_generation.py: minutes per surviving mutant) would make a full module run take hours.
set -euo pipefail
module="${1:?usage: tools/mutation.sh verbalization|processing|generation|decoding [max-children]}"
children="${2:-1}"
case "$module" in
  verbalization) pattern="moai_sdk.verbalization.*" tests="test_verbalization.py" ;;
  processing) pattern="moai_sdk.processing.*" tests="test_processing.py" ;;
  generation) pattern="moai_sdk.modeling.generation.*" tests="test_generation.py" ;;
  decoding) pattern="moai_sdk.modeling.decoding.*" tests="test_decoding.py" ;;
  *) echo "unknown module: $module" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
# mutmut puts mutants/src first on sys.path; the checked-out src must not shadow it.
export PYTHONPATH="${MUTATION_EXTRA_PATH:-}"
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 MPLBACKEND=Agg HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
# mutmut forks a test process per mutant from a parent that has run torch: with torch's OpenMP pool started, the
# forked children hang in their first parallel region (every mutant of processing.py timed out); one thread each
# avoids it (MOAI_TEST_THREADS: tests/conftest.py otherwise sets torch to 2 threads, over OMP_NUM_THREADS).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" MOAI_TEST_THREADS=1
tests="${MUTATION_TESTS:-$tests}"
keyword="$(echo "$tests" | sed 's/ \+/ or /g')"
export PYTEST_ADDOPTS="-k '$keyword'"
# mutmut keeps which tests reach which function (mutants/mutmut-stats.json) between runs; with another test
# selection those are stale, so a changed selection starts from a fresh mutants/ folder.
if [ -d mutants ] && [ "$(cat mutants/.mutation-tests 2>/dev/null)" != "$tests" ]; then
  rm -rf mutants
fi
mkdir -p mutants && echo "$tests" > mutants/.mutation-tests
mutmut run --max-children "$children" "$pattern"
mutmut results --all true 2>/dev/null | grep -F "${pattern%\*}" > "mutants/survivors-$module.all.txt" || true
grep -v ": killed$" "mutants/survivors-$module.all.txt" > "mutants/survivors-$module.txt" || true
echo "mutants: $(wc -l < "mutants/survivors-$module.all.txt"), not killed: $(wc -l < "mutants/survivors-$module.txt")" \
  "(list in mutants/survivors-$module.txt)"
