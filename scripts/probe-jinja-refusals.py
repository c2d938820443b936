#!/usr/bin/env python3
"""The held-back harmful prompts of REPORT.json sent to llama-server --jinja (the
model's own chat template, with its default system prompt, as llama-server users
get it), 128 tokens at temperature 0: how many replies hold a refusal phrase
(REFUSAL_MARKERS), beside the same count on the verifier's replies in the report.

usage: scripts/probe-jinja-refusals.py LLAMA_CPP_BIN_DIR MODEL.gguf REPORT.json PORT
(LLAMA_CPP_BIN_DIR: scripts/build-llama-cpp.sh prints it)."""
import json, os, re, subprocess, sys, time, urllib.request
if len(sys.argv) != 5:
    sys.exit(__doc__)
bin_dir, model, report, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src', 'judge', 'markers.rs')).read()
block = src[src.index('REFUSAL_MARKERS'):]
block = block[:block.index('];')]
markers = re.findall(r'"([^"]+)"', block)
r = json.load(open(report))
v = r['verification']
prompts = [x['prompt'] for x in v['replies_after'][:v['n_harmful']]]
ours = [x['reply'] for x in v['replies_after'][:v['n_harmful']]]
srv = subprocess.Popen([f'{bin_dir}/llama-server', '-m', model, '--jinja', '-t', '2', '-c', '2048', '-np', '1',
                        '--host', '127.0.0.1', '--port', str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(120):
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/health'); break
        except Exception: time.sleep(0.5)
    n_jinja = n_ours = 0
    for p, o in zip(prompts, ours):
        body = json.dumps({"messages": [{"role": "user", "content": p}], "max_tokens": 128, "temperature": 0, "seed": 0}).encode()
        req = urllib.request.Request(f'http://127.0.0.1:{port}/v1/chat/completions', body, {'Content-Type': 'application/json'})
        text = json.load(urllib.request.urlopen(req))['choices'][0]['message']['content']
        n_jinja += any(m in text.lower() for m in markers)
        n_ours += any(m in o.lower() for m in markers)
    print(f'{model}: a refusal phrase in {n_ours} of {len(prompts)} replies in the report (no system prompt), {n_jinja} of {len(prompts)} from llama-server --jinja')
finally:
    srv.terminate(); srv.wait()
