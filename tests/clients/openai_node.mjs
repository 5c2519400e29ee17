// Drives the `openai` npm package against a fastpilot server and prints what it got as JSON.
// Usage: node openai_node.mjs <base_url ending in /v1> <api key> <model> <scenario>
// Scenarios print the SDK's own parsed results (tests/test_clients_node.py compares them
// with fastpilot's direct answers).
import OpenAI from "openai";

const [baseURL, apiKey, model, scenario] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
const greedy = { model, max_tokens: 8, temperature: 0 };

async function run() {
  switch (scenario) {
    case "completion": {
      const r = await client.completions.create({ ...greedy, prompt: "def fib(n):" });
      return { texts: r.choices.map((c) => c.text), usage: r.usage };
    }
    case "prompt-list": {
      const r = await client.completions.create({
        ...greedy,
        prompt: ["def fib(n):", "import os\n"],
      });
      return { choices: r.choices.map((c) => ({ index: c.index, text: c.text })), usage: r.usage };
    }
    case "stream": {
      const stream = await client.completions.create({
        ...greedy,
        prompt: "def fib(n):",
        stream: true,
      });
      let text = "";
      let finish = null;
      for await (const chunk of stream) {
        for (const c of chunk.choices) {
          text += c.text;
          finish = c.finish_reason ?? finish;
        }
      }
      return { text, finish };
    }
    case "chat": {
      const r = await client.chat.completions.create({
        ...greedy,
        messages: [{ role: "user", content: "Write a function." }],
      });
      return { content: r.choices[0].message.content, role: r.choices[0].message.role };
    }
    case "models": {
      const ids = [];
      for await (const m of client.models.list()) ids.push(m.id);
      return { ids };
    }
    default:
      throw new Error(`unknown scenario ${scenario}`);
  }
}

run().then(
  (out) => process.stdout.write(JSON.stringify(out) + "\n"),
  (err) => {
    process.stderr.write(`${err?.status ?? ""} ${err?.message ?? err}\n`);
    process.exit(1);
  },
);
