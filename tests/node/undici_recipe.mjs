// Node `undici` ProxyAgent through edgepool (run by tests/clients_recipes.rs).
//
// Usage: node undici_recipe.mjs SPEC.json   (spec format: tests/python/recipe_common.py)
//
// Modes (spec.mode):
//   requestTls           new ProxyAgent({ uri: P, requestTls: { ca: readFileSync(CA) } })
//                        `requestTls` is the TLS to the target inside the CONNECT tunnel,
//                        i.e. to edgepool's interception; `proxyTls` would be for an https://
//                        proxy URL.
//   node_extra_ca_certs  new ProxyAgent(P) with NODE_EXTRA_CA_CERTS=CA set in the
//                        environment by the test (Node reads it once, at start-up).
//
// Every GET goes through ONE ProxyAgent, one after the other; prints the JSON summary on
// the last line of stdout.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { ProxyAgent, request } from "undici";

// Deprecation warnings Node or undici emit while the recipe runs: the test wants none.
const deprecations = [];
process.on("warning", (w) => {
  if (w.name === "DeprecationWarning") deprecations.push(`${w.name}: ${w.code ?? ""} ${w.message}`);
});

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(import.meta.url);
const version = require("undici/package.json").version;

let agent;
if (spec.mode === "requestTls") {
  agent = new ProxyAgent({ uri: spec.proxy, requestTls: { ca: readFileSync(spec.ca) } });
} else if (spec.mode === "node_extra_ca_certs") {
  agent = new ProxyAgent(spec.proxy);
} else {
  throw new Error(`unknown mode ${spec.mode}`);
}

function bodyText(buf) {
  if (buf.length > 64 * 1024) return null;
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(buf);
  } catch {
    return null;
  }
}

const header = (headers, name) => {
  const v = headers[name];
  return v === undefined ? null : Array.isArray(v) ? v.join(", ") : v;
};

const results = [];
for (const url of spec.urls) {
  try {
    const r = await request(url, {
      dispatcher: agent,
      headersTimeout: (spec.timeout ?? 20) * 1000,
      bodyTimeout: (spec.timeout ?? 20) * 1000,
    });
    const buf = Buffer.from(await r.body.arrayBuffer());
    results.push({
      status: r.statusCode,
      len: buf.length,
      sha256: createHash("sha256").update(buf).digest("hex"),
      reused: header(r.headers, "x-edgepool-reused"),
      error: header(r.headers, "x-edgepool-error"),
      // undici's ProxyAgent speaks HTTP/1.1 inside the tunnel.
      http_version: "HTTP/1.1",
      body_text: bodyText(buf),
    });
  } catch (e) {
    const cause = e.cause ? ` (cause: ${e.cause.code ?? ""} ${e.cause.message ?? e.cause})` : "";
    results.push({ exception: `${e.name}: ${e.code ?? ""} ${e.message}${cause}` });
  }
}
await agent.close();
process.stdout.write(
  JSON.stringify({
    client: `undici ${version} (node ${process.version})`,
    mode: spec.mode,
    deprecations,
    results,
  }) + "\n",
);
