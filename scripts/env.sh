# Sourced by the scripts: create/activate the virtual environment and install
# megatron_asvr (editable, dev extras) into it when setup.py or csrc/ changed.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
source "$VENV/bin/activate"
stamp="$VENV/.megatron_asvr-installed"
want=$(cat setup.py $(find csrc -type f 2>/dev/null | sort) | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch first: the csrc extensions build against it (--no-build-isolation).
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q torch==2.14.1 pybind11
    python -m pip install -q --no-build-isolation -e '.[dev]'
    echo "$want" > "$stamp"
fi
