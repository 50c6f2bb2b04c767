"""Talks to `flotilla-worker serve` with the official `openai` Python client (pip install openai).

flotilla-worker serve --checkpoint DIR --port 18777 --model-name moe-tiny &
python3 engine/scripts/openai_client.py [http://127.0.0.1:18777/v1]
"""
import sys

from openai import OpenAI
c = OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:18777/v1", api_key="unused")
print("models:", [m.id for m in c.models.list().data])
r = c.completions.create(model="moe-tiny", prompt="The ", max_tokens=12)
print("completion:", repr(r.choices[0].text), r.usage)
r = c.chat.completions.create(model="moe-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
print("chat:", repr(r.choices[0].message.content), r.choices[0].finish_reason)
s = c.chat.completions.create(model="moe-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
print("stream chunks:", [ch.choices[0].delta.content for ch in s if ch.choices])
