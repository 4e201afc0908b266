#!/usr/bin/env bash
# Run the C part (verifier/eventlog/_native.c) under gcc's AddressSanitizer and
# UndefinedBehaviorSanitizer: build an instrumented copy of the module into a
# scratch copy of the tree, then run the event-log tests and every input of the
# given corpus directories (plus 300 seeded mutations of each) through
# fuzz/fuzz_native.py's differential check. Python's own coverage is broken
# under a preloaded ASan runtime, so the coverage-guided fuzzing is done
# without it (fuzz/fuzz_native.py) and its corpus replayed here.
#
#   fuzz/asan_native.sh [CORPUS_DIR...]      (default: ../shared/corpus/eventlogs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar --exclude=.venv --exclude=.git --exclude='*.so' -cf - . | tar -xf - -C "$WORK"
INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -shared -fPIC \
  -Wall -Wextra -Wno-unused-parameter -I"$INCLUDE" \
  verifier/eventlog/_native.c -lcrypto -o "$WORK/verifier/eventlog/_native$SUFFIX"
export VTPM_CORPUS="${VTPM_CORPUS:-$(cd ../shared/corpus && pwd)}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
cd "$WORK"
"$OLDPWD/$PY" -m pytest -q --capture=sys -p no:cacheprovider tests/verifier/eventlog -k "not installed_script and not sanitizers"
"$OLDPWD/$PY" - "${@:-$VTPM_CORPUS/eventlogs}" <<'PYTHON'
import random, sys
from pathlib import Path

sys.path.insert(0, ".")
source = Path("fuzz/fuzz_native.py").read_text()
source = source.replace("import atheris\n", "").replace(
    "with atheris.instrument_imports():", "if True:"
)
target: dict[str, object] = {"__name__": "fuzz_native"}
exec(compile(source, "fuzz/fuzz_native.py", "exec"), target)  # noqa: S102 - our own file
check = target["TestOneInput"]
rng = random.Random(1)
count = 0
for directory in sys.argv[1:]:
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        data = path.read_bytes()
        check(data)
        count += 1
        for _ in range(300):
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                k = rng.random()
                if k < 0.4 and b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
                elif k < 0.7 and b:
                    del b[rng.randrange(len(b)) :]
                elif k < 0.9 and len(b) > 4:
                    i = rng.randrange(len(b) - 3)
                    b[i : i + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, b"\1\0\0\0", b"\xff\xff\xff\x7f"])
                else:
                    b += bytes([rng.choice([0, 255])]) * rng.randint(1, 40)
            check(bytes(b))
            count += 1
print(f"asan_native: {count} inputs, no sanitizer report, C and Python agree")
PYTHON
