"""A model given as a folder or a Hugging Face repository id, resolved to a local folder.

A repository id is resolved by huggingface_hub to a snapshot in its cache: downloaded when online (only the
files a model needs: config, safetensors, tokenizer, chat template), read from the cache when offline
(HF_HUB_OFFLINE=1), with a clear error when it is not there.
"""
from __future__ import annotations

import re
from pathlib import Path

from .config import SettingError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model needs from a repository; never pickles (*.bin, *.pt), never the original/ subfolders.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt"]
EXPECTED = ("expected a model folder (holding config.json and *.safetensors) or a Hugging Face repository id "
            "such as Qwen/Qwen3-30B-A3B")


def check_model_argument(text: str | Path) -> Path | None:
    """A model argument checked without importing anything heavy: the folder, or None for a repository id; a
    file, or a path that does not exist and is no repository id, is a `SettingError` saying what is expected."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        hint = " (it is the model's config file: pass its folder)" if path.name == "config.json" else ""
        raise SettingError("model", f"model {str(text)!r} is a file{hint}: {EXPECTED}")
    if not _REPO_ID.match(str(text)) or str(text).startswith((".", "~")):
        raise SettingError("model", f"model folder {str(text)!r} does not exist: {EXPECTED}")
    return None


def resolve_model(text: str | Path, *, progress: bool = False) -> Path:
    """The local folder for a model argument: the folder itself, or the repository's snapshot."""
    folder = check_model_argument(text)
    return folder if folder is not None else _snapshot(str(text), progress)


def _snapshot(repo_id: str, progress: bool) -> Path:
    from huggingface_hub import constants, snapshot_download

    from .checkpoint import CheckpointError
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError as exc:
        where = "offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise CheckpointError(f"{repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}: "
                              f"download it where there is a network, or pass a local folder") from exc
    except GatedRepoError as exc:
        raise CheckpointError(f"{repo_id!r} is gated: accept its license on huggingface.co and log in "
                              "(huggingface-cli login), or pass a local folder") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"no repository {repo_id!r} on the Hugging Face Hub (or it is private): {EXPECTED}") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {repo_id!r} failed: {exc}") from exc
    finally:
        if not progress:
            enable_progress_bars()
