"""README.md's serving examples, run as written against a test server (only the address and the
picture substituted): the curl call and the openai-client loop."""

import json
import re
import subprocess

from conftest import IMAGE, ROOT


def example(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"README.md lost its {marker} block"
    return m.group(1).replace("http://127.0.0.1:8080", "SERVER").replace("cat.png", str(IMAGE))


def test_curl_example(server):
    script = example("serve-curl-example").replace("SERVER", server.url)
    out = subprocess.run(["bash", "-c", script.replace("curl ", "curl -sS --fail-with-body ", 1)],
                         check=True, capture_output=True, text=True).stdout
    answer = json.loads(out)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]


def test_openai_client_example(server, capsys):
    code = example("serve-python-example").replace("SERVER", server.url)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
