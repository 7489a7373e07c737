# Sourced by the scripts: create/activate the virtual environment and install
# megatron_asvr (editable, dev extras) into it when setup.py or csrc/ changed.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
source "$VENV/bin/activate"
# Python writes each module's .pyc on its first import and reads it after. A machine that sets
# PYTHONDONTWRITEBYTECODE (this one does) compiles torch and megatron-core from source at every
# interpreter start instead: 13 CPU-s per import of megatron-core against 5 s, paid by every
# torchrun worker and tool the tests start.
unset PYTHONDONTWRITEBYTECODE
stamp="$VENV/.megatron_asvr-installed"
# MEGATRON_ASVR_EXTENSIONS (setup.py: all, cpu or cuda) is part of what was installed
want=$( (cat setup.py $(find csrc -type f 2>/dev/null | sort); echo "${MEGATRON_ASVR_EXTENSIONS:-all}") \
    | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch first: the csrc extensions build against it (--no-build-isolation). --no-compile: no .pyc
    # for the ~13,000 installed modules up front (minutes on 2 cores); Python writes those the project
    # imports on their first import (above).
    python -m pip install -q --no-compile --upgrade pip setuptools wheel
    python -m pip install -q --no-compile torch==2.14.1 pybind11
    python -m pip install -q --no-compile --no-build-isolation -e '.[dev]'
    echo "$want" > "$stamp"
fi
