"""Write persisted-documents.json: every operation the generated client sends, by its
SHA-256, the service's trusted-documents manifest (TRUSTED_DOCUMENTS).

    python manifest.py        # after `ariadne-codegen client`

Read from gqls_client/client.py itself (each string literal given to `gql`, the very text the
client sends), so the manifest can't disagree with the client. A test checks it is current.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def documents() -> dict[str, str]:
    tree = ast.parse((HERE / "gqls_client" / "client.py").read_text(encoding="utf-8"))
    texts = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "gql"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    return {hashlib.sha256(text.encode()).hexdigest(): text for text in texts}


if __name__ == "__main__":
    (HERE / "persisted-documents.json").write_text(json.dumps(documents(), indent=2, sort_keys=True) + "\n")
