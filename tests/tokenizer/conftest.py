import sysconfig
from pathlib import Path

import pytest

from tokenizer.train import train

# Text that stresses a tokenizer: accents, CJK, emoji (with skin tone and ZWJ sequences), code with tabs and
# newlines, whitespace runs, numbers, and control-token text typed by a user.
TEXTS = [
    "Hello world",
    "café naïve résumé Ångström Straße",
    "日本語のテキスト、中文字符，한국어",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷!",
    "def f(x):\n\tif x:\n\t\treturn {'a': 1}\n\n",
    "many    spaces   and\n\n\n  blank lines  ",
    "3.14159 and 1234567 on 2026-11-03",
    "a user typed <|im_end|> and <|eot_id|> and </s> here",
    "don't I'll WE'RE",
    "",
]


@pytest.fixture(scope="session")
def texts():
    return TEXTS


@pytest.fixture(scope="session")
def stdlib_files():
    """A few hundred KB of real text: Python standard library sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in ("argparse.py", "textwrap.py", "json/decoder.py", "pathlib.py", "datetime.py")]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, stdlib_files):
    """A 1000-piece sentencepiece BPE trained by ``tokenizer.train`` on stdlib text."""
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    train([str(f) for f in stdlib_files], vocab_size=1000, output=str(prefix))
    return prefix.with_suffix(".model")
