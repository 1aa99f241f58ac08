// Hearth's web UI: sign-in and "My VM" (size picker, status, live log, terminal).
import { render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal as XTerm } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";
import "./style.css";
import { ApiError, call, setCsrf, type Flavor, type Me, type Schemas, type Session, type User, type UserVm } from "./api";

function message(e: unknown): string {
  return e instanceof ApiError || e instanceof Error ? e.message : String(e);
}

function Alert({ error }: { error: string }) {
  return error ? <p class="alert" role="alert">{error}</p> : null;
}

function SignIn({ onSignedIn }: { onSignedIn: (s: Session) => void }) {
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  // A refused OpenID sign-in comes back as /?error=...
  const [error, setError] = useState(new URLSearchParams(location.search).get("error") ?? "");
  const [busy, setBusy] = useState(false);
  const [oidc, setOidc] = useState<Schemas["OidcView"] | null>(null);
  useEffect(() => {
    call<Schemas["OidcView"]>("GET", "/v1/auth/oidc").then(setOidc).catch(() => setOidc(null));
  }, []);
  async function submit(e: Event) {
    e.preventDefault();
    setBusy(true);
    setError("");
    try {
      onSignedIn(await call<Session>("POST", "/v1/auth/sign-in", { email, password }));
    } catch (err) {
      setError(message(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <main class="signin">
      <h1>Hearth</h1>
      <form onSubmit={submit} aria-label="Sign in">
        <label>
          Email
          <input type="email" name="email" autocomplete="username" required value={email} onInput={(e) => setEmail(e.currentTarget.value)} />
        </label>
        <label>
          Password
          <input type="password" name="password" autocomplete="current-password" required value={password} onInput={(e) => setPassword(e.currentTarget.value)} />
        </label>
        <Alert error={error} />
        <button type="submit" disabled={busy}>{busy ? "Signing in…" : "Sign in"}</button>
      </form>
      {oidc?.enabled ? (
        <p class="or">
          <a class="button" href="/v1/auth/oidc/start">Sign in with {oidc.name}</a>
        </p>
      ) : null}
    </main>
  );
}

/** `/ui/password?token=...`: an invitation or a reset link an admin made. */
function SetPassword({ token, onDone }: { token: string; onDone: () => void }) {
  const [password, setPassword] = useState("");
  const [again, setAgain] = useState("");
  const [error, setError] = useState("");
  async function submit(e: Event) {
    e.preventDefault();
    if (password !== again) return setError("the two passwords differ");
    setError("");
    try {
      await call("POST", "/v1/auth/password", { token, password });
      history.replaceState(null, "", "/");
      onDone();
    } catch (err) {
      setError(message(err));
    }
  }
  return (
    <main class="signin">
      <h1>Hearth</h1>
      <form onSubmit={submit} aria-label="Set your password">
        <p>Choose a password (12 characters or more).</p>
        <label>
          New password
          <input type="password" autocomplete="new-password" minLength={12} required value={password} onInput={(e) => setPassword(e.currentTarget.value)} />
        </label>
        <label>
          Again
          <input type="password" autocomplete="new-password" minLength={12} required value={again} onInput={(e) => setAgain(e.currentTarget.value)} />
        </label>
        <Alert error={error} />
        <button type="submit">Set password</button>
      </form>
    </main>
  );
}

type LogLine = { timestamp: string; level: string; message: string };

/** What fits the caller's quota, or why not. */
function refusal(f: Flavor, me: Me | null): string {
  if (!me) return "";
  const q = me.quota;
  if (f.vcpus > q.maxVcpus) return `more than your ${q.maxVcpus} vCPUs`;
  if (f.memoryMb > q.maxMemoryMb) return `more than your ${q.maxMemoryMb} MB of memory`;
  if (f.diskGb > q.maxDiskGb) return `more than your ${q.maxDiskGb} GB of disk`;
  return "";
}

function SizePicker({ onProvisioned }: { onProvisioned: () => void }) {
  const [flavors, setFlavors] = useState<Flavor[]>([]);
  const [me, setMe] = useState<Me | null>(null);
  const [chosen, setChosen] = useState<string>("");
  const [sshKey, setSshKey] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    Promise.all([call<{ items: Flavor[] }>("GET", "/v1/flavors"), call<Me>("GET", "/v1/me")])
      .then(([f, m]) => {
        setFlavors(f.items);
        setMe(m);
        const mine = f.items.find((x) => x.id === m.user.tier && !refusal(x, m)) ?? f.items.find((x) => !refusal(x, m));
        setChosen(mine?.id ?? "");
      })
      .catch((e) => setError(message(e)));
  }, []);
  async function provision() {
    const f = flavors.find((x) => x.id === chosen);
    if (!f) return;
    setBusy(true);
    setError("");
    try {
      await call("POST", "/v1/me/vm", { vcpus: f.vcpus, memoryMb: f.memoryMb, diskGb: f.diskGb, sshPublicKey: sshKey.trim() || undefined });
      onProvisioned();
    } catch (e) {
      setError(message(e));
      setBusy(false);
    }
  }
  return (
    <section class="card" aria-labelledby="pick">
      <h2 id="pick">Your VM</h2>
      <p>You have no VM yet. Pick a size:</p>
      <fieldset class="sizes">
        <legend>Size</legend>
        {flavors.map((f) => {
          const why = refusal(f, me);
          return (
            <label class={`size ${why ? "off" : ""}`} key={f.id}>
              <input type="radio" name="size" value={f.id} checked={chosen === f.id} disabled={!!why} onChange={() => setChosen(f.id)} />
              <strong>{f.name}</strong> {f.vcpus} vCPU · {f.memoryMb / 1024} GB memory · {f.diskGb} GB disk
              {me && f.id === me.user.tier ? <em> (your tier's default)</em> : null}
              {why ? <span class="why"> — {why}</span> : null}
            </label>
          );
        })}
      </fieldset>
      <label>
        Your SSH public key (optional: to SSH in from your machine; the terminal here works without it)
        <textarea name="sshPublicKey" rows={2} value={sshKey} onInput={(e) => setSshKey(e.currentTarget.value)} />
      </label>
      <Alert error={error} />
      <button onClick={provision} disabled={busy || !chosen}>{busy ? "Provisioning…" : "Provision my VM"}</button>
    </section>
  );
}

function TerminalView({ environmentId }: { environmentId: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [error, setError] = useState("");
  useEffect(() => {
    const term = new XTerm({ cursorBlink: true, fontSize: 14, convertEol: false });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(box.current!);
    fit.fit();
    let socket: WebSocket | null = null;
    const encoder = new TextEncoder();
    const resize = () => {
      fit.fit();
      if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    };
    call<{ ticket: string }>("POST", `/v1/environments/${environmentId}/terminal/ticket`)
      .then(({ ticket }) => {
        const scheme = location.protocol === "https:" ? "wss" : "ws";
        socket = new WebSocket(`${scheme}://${location.host}/v1/environments/${environmentId}/terminal?ticket=${encodeURIComponent(ticket)}`);
        socket.binaryType = "arraybuffer";
        socket.onopen = () => {
          resize();
          term.focus();
        };
        socket.onmessage = (e) => term.write(typeof e.data === "string" ? e.data : new Uint8Array(e.data));
        socket.onclose = () => term.write("\r\n[the terminal closed]\r\n");
        term.onData((d) => socket?.readyState === WebSocket.OPEN && socket.send(encoder.encode(d)));
      })
      .catch((e) => setError(message(e)));
    window.addEventListener("resize", resize);
    return () => {
      window.removeEventListener("resize", resize);
      socket?.close();
      term.dispose();
    };
  }, [environmentId]);
  return (
    <section class="card" aria-label="Terminal">
      <h2>Terminal</h2>
      <Alert error={error} />
      <div class="terminal" ref={box} data-testid="terminal" />
    </section>
  );
}

type Activity = Schemas["ActivityView"];
type ExecutionSummary = Schemas["ExecutionSummaryView"];
type Exec = Schemas["ExecView"];

const sources: Record<string, string> = { exec: "a command", terminal: "your terminal", keepalive: "a keepalive", start: "a start" };

/** "stops in 23 min: last activity was your terminal at 14:02" */
function activityLine(a: Activity): string {
  const last = a.lastActivityAt ? `last activity was ${sources[a.lastActivitySource ?? ""] ?? a.lastActivitySource ?? "something"} at ${new Date(a.lastActivityAt).toLocaleTimeString()}` : "no activity yet";
  if (a.nextAutoStopAt) {
    const minutes = Math.max(0, Math.round((new Date(a.nextAutoStopAt).getTime() - Date.now()) / 60000));
    return `stops in ${minutes} min: ${last}`;
  }
  return `${a.reason}; ${last}`;
}

/** Runs a command and shows its output; lists the latest runs. */
function Commands({ environmentId, running }: { environmentId: string; running: boolean }) {
  const [code, setCode] = useState("");
  const [result, setResult] = useState<Exec | null>(null);
  const [history, setHistory] = useState<ExecutionSummary[]>([]);
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const load = () =>
    call<{ items: ExecutionSummary[] }>("GET", `/v1/environments/${environmentId}/executions?limit=20`).then((h) => setHistory(h.items)).catch((e) => setError(message(e)));
  useEffect(() => {
    load();
  }, [environmentId]);
  async function run(e: Event) {
    e.preventDefault();
    setBusy(true);
    setError("");
    try {
      setResult(await call<Exec>("POST", `/v1/environments/${environmentId}/exec`, { code }));
      load();
    } catch (err) {
      setError(message(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <section class="card" aria-labelledby="commands">
      <h2 id="commands">Commands</h2>
      <form class="inline" onSubmit={run}>
        <label>Command<input name="command" required value={code} onInput={(e) => setCode(e.currentTarget.value)} /></label>
        <button type="submit" disabled={busy || !running}>{busy ? "Running…" : "Run"}</button>
      </form>
      <Alert error={error} />
      {result ? (
        <div data-testid="exec-result">
          <p>exit code {result.exitCode ?? "none"}{result.timedOut ? " (timed out)" : ""} in {result.durationMs} ms</p>
          {result.stdout ? <pre class="out">{result.stdout}</pre> : null}
          {result.stderr ? <pre class="out err">{result.stderr}</pre> : null}
        </div>
      ) : null}
      {history.length ? (
        <table>
          <caption class="sr">Latest commands</caption>
          <thead>
            <tr><th scope="col">When</th><th scope="col">Command</th><th scope="col">Exit</th><th scope="col">Took</th></tr>
          </thead>
          <tbody>
            {history.map((x) => (
              <tr key={x.id}>
                <td>{new Date(x.startedAt).toLocaleTimeString()}</td>
                <td><code>{x.command}</code></td>
                <td>{x.exitCode ?? x.status}</td>
                <td>{x.durationMs ?? ""} ms</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
    </section>
  );
}

/** What the status card shows of a personal VM or an environment, and where to act on it. */
type Machine = {
  environmentId: string;
  title: string;
  state: string;
  stateMessage?: string | null;
  generation: number;
  vcpus: number;
  memoryMb: number;
  diskGb: number;
  sshHost?: string | null;
  sshPort?: number | null;
  sshUser: string;
  /** The owner gave a key of their own, so `ssh` works from their machine. */
  hasUserSshKey: boolean;
  facts: [string, string][];
  /** The path start, stop and destroy act on (`/v1/me/vm`, `/v1/environments/{id}`). */
  base: string;
};

function MachineCard({ m, onChanged }: { m: Machine; onChanged: () => void }) {
  const [log, setLog] = useState<LogLine[]>([]);
  const [state, setState] = useState(m.state);
  const [error, setError] = useState("");
  const [terminal, setTerminal] = useState(false);
  const [activity, setActivity] = useState<Activity | null>(null);
  useEffect(() => setState(m.state), [m.state, m.generation]);
  useEffect(() => {
    call<Activity>("GET", `/v1/environments/${m.environmentId}/activity`).then(setActivity).catch(() => setActivity(null));
  }, [m.environmentId, m.generation]);
  useEffect(() => {
    const events = new EventSource(`/v1/environments/${m.environmentId}/events`);
    events.addEventListener("log", (e) => setLog((l) => [...l.slice(-499), JSON.parse((e as MessageEvent).data)]));
    events.addEventListener("state", (e) => {
      setState(JSON.parse((e as MessageEvent).data).state);
      onChanged();
    });
    return () => events.close();
  }, [m.environmentId]);
  async function act(method: string, path: string, confirmText?: string) {
    if (confirmText && !window.confirm(confirmText)) return;
    setError("");
    try {
      await call(method, path);
      onChanged();
    } catch (e) {
      setError(message(e));
    }
  }
  const running = state === "running";
  const ssh = m.sshPort ? `ssh -p ${m.sshPort} ${m.sshUser}@${m.sshHost}` : "";
  return (
    <>
      <section class="card" aria-labelledby="machine">
        <h2 id="machine">{m.title}</h2>
        <p>
          <span class={`state state-${state}`} data-testid="state">{state}</span>
          {m.stateMessage ? <span class="muted"> {m.stateMessage}</span> : null}
        </p>
        {activity ? <p class="muted" data-testid="activity">{activityLine(activity)}</p> : null}
        <dl class="facts">
          <dt>Size</dt>
          <dd>{m.vcpus} vCPU · {m.memoryMb} MB · {m.diskGb} GB</dd>
          {m.facts.map(([k, v]) => (
            <>
              <dt>{k}</dt>
              <dd>{v}</dd>
            </>
          ))}
          {ssh ? (
            <>
              <dt>SSH</dt>
              <dd data-testid="ssh">
                {m.hasUserSshKey ? (
                  <>
                    <code>{ssh}</code> <button class="small" onClick={() => navigator.clipboard?.writeText(ssh)}>Copy</button>
                  </>
                ) : (
                  <span class="muted">give your public key when you create it to SSH in from your machine; the terminal works without one</span>
                )}
              </dd>
            </>
          ) : null}
        </dl>
        <div class="actions">
          <button onClick={() => act("POST", `${m.base}/start`)} disabled={state !== "stopped"}>Start</button>
          <button onClick={() => act("POST", `${m.base}/stop`)} disabled={!running}>Stop</button>
          <button class="danger" onClick={() => act("DELETE", m.base, `Destroy ${m.title.toLowerCase()}? Its disk is deleted.`)}>Destroy</button>
          <button onClick={() => setTerminal((t) => !t)} disabled={!running} aria-pressed={terminal}>Terminal</button>
        </div>
        <Alert error={error} />
      </section>
      {terminal && running ? <TerminalView environmentId={m.environmentId} /> : null}
      <Commands environmentId={m.environmentId} running={running} />
      <section class="card" aria-labelledby="log">
        <h2 id="log">Log</h2>
        <ol class="log" data-testid="log" aria-live="polite">
          {log.map((l, i) => (
            <li key={i} class={`level-${l.level}`}>
              <time>{new Date(l.timestamp).toLocaleTimeString()}</time> {l.message}
            </li>
          ))}
        </ol>
      </section>
    </>
  );
}

function VmCard({ vm, onChanged }: { vm: UserVm; onChanged: () => void }) {
  const m: Machine = {
    environmentId: vm.environmentId,
    title: "Your VM",
    state: vm.status,
    stateMessage: vm.stateMessage,
    generation: vm.generation,
    vcpus: vm.vcpus,
    memoryMb: vm.memoryMb,
    diskGb: vm.diskGb,
    sshHost: vm.sshHost,
    sshPort: vm.sshPort,
    sshUser: vm.sshUser,
    hasUserSshKey: vm.hasUserSshKey,
    facts: [
      ["Runtime", `${vm.totalRuntimeMinutes} min`],
      ["Host", vm.hostName ?? "not placed"],
    ],
    base: "/v1/me/vm",
  };
  return <MachineCard m={m} onChanged={onChanged} />;
}

type Env = Schemas["EnvironmentView"];

/** `KEY=VALUE` lines into a map; says which line is wrong. */
function parseVars(text: string): Record<string, string> {
  const vars: Record<string, string> = {};
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`line ${i + 1} of the variables is not KEY=VALUE`);
    vars[line.slice(0, at).trim()] = line.slice(at + 1);
  });
  return vars;
}

function CreateEnvironment({ onCreated }: { onCreated: (e: Env) => void }) {
  const [f, setF] = useState({ name: "", vcpus: "", memoryMb: "", diskGb: "", durationHours: "", initScript: "", vars: "", sshPublicKey: "" });
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const set = (k: keyof typeof f) => (e: Event) => setF({ ...f, [k]: (e.currentTarget as HTMLInputElement).value });
  const num = (v: string) => (v.trim() ? Number(v) : undefined);
  async function submit(e: Event) {
    e.preventDefault();
    setError("");
    setBusy(true);
    try {
      const made = await call<Env>("POST", "/v1/environments", {
        name: f.name,
        vcpus: num(f.vcpus),
        memoryMb: num(f.memoryMb),
        diskGb: num(f.diskGb),
        durationHours: num(f.durationHours),
        initScript: f.initScript.trim() ? f.initScript : undefined,
        environmentVars: parseVars(f.vars),
        sshPublicKey: f.sshPublicKey.trim() ? f.sshPublicKey.trim() : undefined,
      });
      onCreated(made);
    } catch (err) {
      setError(message(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <form class="card create" onSubmit={submit} aria-labelledby="new-env">
      <h2 id="new-env">New environment</h2>
      <label>Name<input name="name" required maxLength={64} value={f.name} onInput={set("name")} /></label>
      <div class="row">
        <label>vCPUs<input name="vcpus" type="number" min={1} placeholder="tier default" value={f.vcpus} onInput={set("vcpus")} /></label>
        <label>Memory (MB)<input name="memoryMb" type="number" min={256} placeholder="tier default" value={f.memoryMb} onInput={set("memoryMb")} /></label>
        <label>Disk (GB)<input name="diskGb" type="number" min={1} placeholder="tier default" value={f.diskGb} onInput={set("diskGb")} /></label>
        <label>Duration (hours)<input name="durationHours" type="number" min={1} placeholder="tier default" value={f.durationHours} onInput={set("durationHours")} /></label>
      </div>
      <label>Init script (runs once, as dev, when SSH answers)<textarea name="initScript" rows={3} value={f.initScript} onInput={set("initScript")} /></label>
      <label>Environment variables (KEY=VALUE, one per line)<textarea name="vars" rows={3} value={f.vars} onInput={set("vars")} /></label>
      <label>Your SSH public key (optional)<textarea name="sshPublicKey" rows={2} value={f.sshPublicKey} onInput={set("sshPublicKey")} /></label>
      <Alert error={error} />
      <button type="submit" disabled={busy}>{busy ? "Creating…" : "Create"}</button>
    </form>
  );
}

/** Calls `load` now and whenever the list stream at `path` says something changed. */
function useListChanges(path: string, load: () => void) {
  useEffect(() => {
    load();
    const events = new EventSource(path);
    events.addEventListener("changed", () => load());
    return () => events.close();
  }, [path]);
}

/** The caller's environments, re-read when their list stream says something changed; each
 * opens to its own page. */
function Environments({ open }: { open: (id: string) => void }) {
  const [items, setItems] = useState<Env[] | null>(null);
  const [error, setError] = useState("");
  const load = () => call<{ items: Env[] }>("GET", "/v1/environments?limit=100").then((p) => setItems(p.items)).catch((e) => setError(message(e)));
  useListChanges("/v1/environments/events", load);
  return (
    <>
      <section class="card" aria-labelledby="envs">
        <h2 id="envs">Environments</h2>
        <Alert error={error} />
        {items === null ? <p aria-busy="true">Loading…</p> : items.filter((e) => !e.personal && e.state !== "destroyed").length === 0 ? <p>None yet.</p> : (
          <table>
            <thead>
              <tr><th scope="col">Name</th><th scope="col">State</th><th scope="col">Size</th><th scope="col">Host</th><th scope="col">Expires</th></tr>
            </thead>
            <tbody>
              {items.filter((e) => !e.personal && e.state !== "destroyed").map((e) => (
                <tr key={e.id} data-name={e.name}>
                  <td><a href={`/ui/environments/${e.id}`} onClick={(ev) => { ev.preventDefault(); open(e.id); }}>{e.name}</a> <span class="muted">{e.slug}</span></td>
                  <td><span class={`state state-${e.state}`}>{e.state}</span></td>
                  <td>{e.vcpus} vCPU · {e.memoryMb} MB · {e.diskGb} GB</td>
                  <td>{e.hostName ?? e.provider}</td>
                  <td>{e.expiresAt ? new Date(e.expiresAt).toLocaleString() : "never"}</td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </section>
      <CreateEnvironment onCreated={(e) => open(e.id)} />
    </>
  );
}

function EnvironmentPage({ id, back }: { id: string; back: () => void }) {
  const [env, setEnv] = useState<Env | null>(null);
  const [error, setError] = useState("");
  const load = () => call<Env>("GET", `/v1/environments/${id}`).then(setEnv).catch((e) => setError(message(e)));
  useEffect(() => {
    load();
  }, [id]);
  if (error) return <Alert error={error} />;
  if (!env) return <p aria-busy="true">Loading…</p>;
  if (env.state === "destroyed") {
    return (
      <section class="card">
        <h2>{env.name}</h2>
        <p>This environment is destroyed.</p>
        <button onClick={back}>Back to environments</button>
      </section>
    );
  }
  const m: Machine = {
    environmentId: env.id,
    title: env.name,
    state: env.state,
    stateMessage: env.stateMessage,
    generation: env.generation,
    vcpus: env.vcpus,
    memoryMb: env.memoryMb,
    diskGb: env.diskGb,
    sshHost: env.sshHost,
    sshPort: env.sshPort,
    sshUser: env.sshUser,
    hasUserSshKey: env.hasUserSshKey,
    facts: [
      ["Id", env.slug],
      ["Host", env.hostName ?? "not placed"],
      ["Expires", env.expiresAt ? new Date(env.expiresAt).toLocaleString() : "never"],
    ],
    base: `/v1/environments/${env.id}`,
  };
  return <MachineCard m={m} onChanged={load} />;
}

function MyVm() {
  const [vm, setVm] = useState<UserVm | null | undefined>(undefined);
  const [error, setError] = useState("");
  async function load() {
    try {
      setVm(await call<UserVm>("GET", "/v1/me/vm"));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) setVm(null);
      else setError(message(e));
    }
  }
  useEffect(() => {
    load();
  }, []);
  if (error) return <Alert error={error} />;
  if (vm === undefined) return <p aria-busy="true">Loading…</p>;
  if (vm === null || vm.status === "destroyed") return <SizePicker onProvisioned={load} />;
  return <VmCard vm={vm} onChanged={load} />;
}

type Token = Schemas["TokenView"];

function when(t: string | null | undefined): string {
  return t ? new Date(t).toLocaleString() : "never";
}

/** The settings page: API tokens, and commands by mail when the server takes them. */
function Settings() {
  const [agent, setAgent] = useState<string | null>(null);
  useEffect(() => {
    call<Me>("GET", "/v1/me").then((me) => setAgent(me.mailAgent ?? null)).catch(() => setAgent(null));
  }, []);
  return (
    <>
      <Tokens />
      {agent ? <MailCard agent={agent} /> : null}
    </>
  );
}

/** API tokens: make, name, see when last used, revoke. */
function Tokens() {
  const [tokens, setTokens] = useState<Token[]>([]);
  const [name, setName] = useState("");
  const [made, setMade] = useState("");
  const [error, setError] = useState("");
  const load = () => call<{ items: Token[] }>("GET", "/v1/me/tokens").then((t) => setTokens(t.items)).catch((e) => setError(message(e)));
  useEffect(() => {
    load();
  }, []);
  async function create(e: Event) {
    e.preventDefault();
    setError("");
    try {
      const t = await call<{ token: string }>("POST", "/v1/me/tokens", { name });
      setMade(t.token);
      setName("");
      load();
    } catch (err) {
      setError(message(err));
    }
  }
  async function revoke(t: Token) {
    if (!window.confirm(`Revoke the token "${t.name}"? Whatever uses it stops working.`)) return;
    setError("");
    try {
      await call("DELETE", `/v1/me/tokens/${t.id}`);
      load();
    } catch (err) {
      setError(message(err));
    }
  }
  return (
    <section class="card" aria-labelledby="tokens">
      <h2 id="tokens">API tokens</h2>
      <table>
        <thead>
          <tr><th scope="col">Name</th><th scope="col">Made</th><th scope="col">Last used</th><th scope="col"><span class="sr">Actions</span></th></tr>
        </thead>
        <tbody>
          {tokens.map((t) => (
            <tr key={t.id}>
              <td>{t.name}</td>
              <td>{when(t.createdAt)}</td>
              <td>{when(t.lastUsedAt)}</td>
              <td><button class="small danger" onClick={() => revoke(t)} aria-label={`Revoke ${t.name}`}>Revoke</button></td>
            </tr>
          ))}
        </tbody>
      </table>
      <form onSubmit={create} class="inline">
        <label>
          New token's name
          <input name="token-name" required maxLength={64} value={name} onInput={(e) => setName(e.currentTarget.value)} />
        </label>
        <button type="submit">Make a token</button>
      </form>
      {made ? (
        <p>
          Your new token (shown this once): <code data-testid="new-token">{made}</code>
        </p>
      ) : null}
      <Alert error={error} />
    </section>
  );
}

type Mail = Schemas["MailView"];

/** Commands by mail: the secret address that proves a message is the user's, and what arrived. */
function MailCard({ agent }: { agent: string }) {
  const [mail, setMail] = useState<Mail[]>([]);
  const [address, setAddress] = useState("");
  const [error, setError] = useState("");
  const load = () =>
    call<{ items: Mail[] }>("GET", "/v1/me/mail?limit=20")
      .then((m) => setMail(m.items))
      .catch((e) => setError(message(e)));
  useEffect(() => {
    load();
  }, []);
  async function make() {
    if (address && !window.confirm("Make a new address? The one you have stops working.")) return;
    setError("");
    try {
      setAddress((await call<{ address: string }>("POST", "/v1/me/mail-address")).address);
    } catch (err) {
      setError(message(err));
    }
  }
  return (
    <section class="card" aria-labelledby="mail">
      <h2 id="mail">Commands by mail</h2>
      <p>
        Mail <code>create</code>, <code>list</code>, <code>status env_…</code>, <code>execute env_…</code> (with a fenced
        block) or <code>destroy env_…</code> to {agent} from your account's address; <code>help</code> answers with the rest.
        Send it to your secret address, or from a domain that signs its mail (DKIM): anything else is ignored.
      </p>
      <div class="actions">
        <button onClick={make}>Make my secret address</button>
        <button class="small" onClick={load}>Refresh</button>
      </div>
      {address ? (
        <p>
          Your address (shown this once; making another voids it): <code data-testid="mail-address">{address}</code>
        </p>
      ) : null}
      <table>
        <thead>
          <tr><th scope="col">Received</th><th scope="col">Subject</th><th scope="col">Command</th><th scope="col">Status</th><th scope="col">Answered</th></tr>
        </thead>
        <tbody>
          {mail.map((m) => (
            <tr key={m.id}>
              <td>{when(m.receivedAt)}</td>
              <td>{m.subject}</td>
              <td>{m.command ?? ""}</td>
              <td>{m.status}</td>
              <td>{when(m.repliedAt)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <Alert error={error} />
    </section>
  );
}

type Vms = Schemas["VmsView"];

/** The seed's admin view: counts, then every personal VM with its owner. */
function AdminVms() {
  const [vms, setVms] = useState<Vms | null>(null);
  const [emails, setEmails] = useState<Record<string, string>>({});
  const [error, setError] = useState("");
  const load = () =>
    Promise.all([call<Vms>("GET", "/v1/admin/vms"), call<{ items: User[] }>("GET", "/v1/admin/users")])
      .then(([v, u]) => {
        setVms(v);
        setEmails(Object.fromEntries(u.items.map((x) => [x.id, x.email])));
      })
      .catch((e) => setError(message(e)));
  useListChanges("/v1/admin/events", load);
  async function destroy(vm: UserVm) {
    if (!window.confirm(`Destroy the VM of ${emails[vm.userId] ?? vm.userId}? Its disk is deleted.`)) return;
    try {
      await call("DELETE", `/v1/admin/environments/${vm.environmentId}`);
      load();
    } catch (e) {
      setError(message(e));
    }
  }
  if (error) return <Alert error={error} />;
  if (!vms) return <p aria-busy="true">Loading…</p>;
  const s = vms.stats;
  const cards: [string, string][] = [
    ["Total", `${s.total}`],
    ["Running", `${s.running}`],
    ["Stopped", `${s.stopped}`],
    ["vCPUs running", `${s.vcpusRunning} of ${s.vcpusTotal}`],
    ["Memory running", `${Math.round(s.memoryMbRunning / 1024)} of ${Math.round(s.memoryMbTotal / 1024)} GB`],
  ];
  return (
    <>
      <section class="stats" aria-label="Counts">
        {cards.map(([k, v]) => (
          <div class="stat" key={k}><span>{k}</span><strong>{v}</strong></div>
        ))}
      </section>
      <CapacityChart />
      <section class="card" aria-labelledby="all">
        <h2 id="all">All VMs</h2>
        <table>
          <thead>
            <tr><th scope="col">Owner</th><th scope="col">State</th><th scope="col">Host</th><th scope="col">Size</th><th scope="col">Runtime</th><th scope="col"><span class="sr">Actions</span></th></tr>
          </thead>
          <tbody>
            {vms.vms.map((vm) => (
              <tr key={vm.id} data-owner={emails[vm.userId] ?? vm.userId}>
                <td>{emails[vm.userId] ?? vm.userId}</td>
                <td><span class={`state state-${vm.status}`}>{vm.status}</span></td>
                <td>{vm.hostName ?? ""}</td>
                <td>{vm.vcpus} vCPU · {vm.memoryMb} MB · {vm.diskGb} GB</td>
                <td>{vm.totalRuntimeMinutes} min</td>
                <td>
                  {vm.status !== "destroyed" && vm.status !== "destroying" ? (
                    <button class="small danger" onClick={() => destroy(vm)} aria-label={`Destroy the VM of ${emails[vm.userId] ?? vm.userId}`}>Destroy</button>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </section>
    </>
  );
}

type Capacity = Schemas["CapacityView"];
type Sample = Schemas["CapacitySampleView"];

/** One chart: each series a line over the last `hours`, y from 0 to `top`. */
function Chart({ title, samples, series, top, unit, hours }: {
  title: string;
  samples: Sample[];
  series: [string, string, (s: Sample) => number][];
  top: number;
  unit: string;
  hours: number;
}) {
  const w = 600, h = 140, pad = 4;
  const end = Date.now(), start = end - hours * 3600_000;
  const x = (s: Sample) => pad + ((new Date(s.at).getTime() - start) / (end - start)) * (w - 2 * pad);
  const y = (v: number) => h - pad - (Math.min(v, top) / Math.max(top, 1)) * (h - 2 * pad);
  const last = samples[samples.length - 1];
  const summary = last
    ? series.map(([name, , f]) => `${name} ${Math.round(f(last))}${unit} now, at most ${Math.round(Math.max(...samples.map(f)))}${unit}`).join("; ")
    : "no samples yet";
  return (
    <figure class="chart">
      <figcaption>
        <strong>{title}</strong> <span class="muted" data-testid={`chart-${title}`}>{summary}</span>
      </figcaption>
      <svg viewBox={`0 0 ${w} ${h}`} role="img" aria-label={`${title} over the last ${hours} hours: ${summary}`} preserveAspectRatio="none">
        <line x1={pad} x2={w - pad} y1={h - pad} y2={h - pad} class="axis" />
        {series.map(([name, colour, f]) => (
          <g key={name}>
            <polyline fill="none" stroke={colour} stroke-width="2" vector-effect="non-scaling-stroke" points={samples.map((s) => `${x(s)},${y(f(s))}`).join(" ")} />
            {last ? <circle cx={x(last)} cy={y(f(last))} r="3" fill={colour} /> : null}
          </g>
        ))}
      </svg>
      <p class="legend">
        {series.map(([name, colour]) => <span key={name}><i style={{ background: colour }} /> {name}</span>)}
        <span class="muted">{hours} h ago → now</span>
      </p>
    </figure>
  );
}

/** Running VMs and capacity held over the last day, from the server's 5-minute samples. */
function CapacityChart() {
  const [c, setC] = useState<Capacity | null>(null);
  const [error, setError] = useState("");
  useEffect(() => {
    const load = () => call<Capacity>("GET", "/v1/admin/capacity?hours=24").then(setC).catch((e) => setError(message(e)));
    load();
    const every = setInterval(load, 60_000);
    return () => clearInterval(every);
  }, []);
  if (error) return <Alert error={error} />;
  if (!c) return null;
  const pct = (used: number, max: number) => (max > 0 ? (100 * used) / max : 0);
  const peak = Math.max(1, ...c.samples.map((s) => s.runningVms));
  return (
    <section class="card" aria-labelledby="last-day">
      <h2 id="last-day">The last day</h2>
      <div class="charts">
        <Chart title="Running VMs" samples={c.samples} top={peak} unit="" hours={24} series={[["running", "#c2410c", (s) => s.runningVms]]} />
        <Chart title="Capacity held" samples={c.samples} top={100} unit="%" hours={24} series={[
          ["vCPUs", "#2563eb", (s) => pct(s.usedVcpus, s.maxVcpus)],
          ["memory", "#15803d", (s) => pct(s.usedMemoryMb, s.maxMemoryMb)],
        ]} />
      </div>
    </section>
  );
}

type Host = Schemas["HostView"];
type Pool = Schemas["PoolView"];
type Job = Schemas["JobView"];
type Audit = Schemas["AuditView"];

/** A labelled bar of `used` out of `max`. */
function Bar({ label, used, max, unit }: { label: string; used: number; max: number; unit: string }) {
  return (
    <div class="bar">
      <span>{label}: {used} of {max} {unit}</span>
      <meter min={0} max={Math.max(max, 1)} value={used} aria-label={`${label} used`} />
    </div>
  );
}

function AdminHosts() {
  const [hosts, setHosts] = useState<Host[] | null>(null);
  const [pools, setPools] = useState<Pool[]>([]);
  const [error, setError] = useState("");
  const load = () =>
    Promise.all([call<{ items: Host[] }>("GET", "/v1/admin/hosts"), call<{ items: Pool[] }>("GET", "/v1/admin/pools")])
      .then(([h, p]) => {
        setHosts(h.items);
        setPools(p.items);
      })
      .catch((e) => setError(message(e)));
  useEffect(() => {
    load();
    const every = setInterval(load, 5000);
    return () => clearInterval(every);
  }, []);
  async function set(h: Host, to: "drain" | "ready") {
    try {
      await call("POST", `/v1/admin/hosts/${h.id}/${to}`);
      load();
    } catch (e) {
      setError(message(e));
    }
  }
  return (
    <section class="card" aria-labelledby="hosts">
      <h2 id="hosts">Hosts</h2>
      <Alert error={error} />
      {(hosts ?? []).map((h) => {
        const r = (h.report ?? {}) as Record<string, unknown>;
        const said = ["version", "backend", "accel", "vms", "containers"].filter((k) => r[k] != null).map((k) => `${k} ${r[k]}`).join(" · ");
        return (
          <article class="host" key={h.id} aria-label={`Host ${h.name}`}>
            <h3>
              {h.name} <span class="muted">{h.kind} · {h.endpoint}</span>
            </h3>
            <p>
              <span class={`state state-${h.health === "healthy" ? "running" : "error"}`}>{h.health}</span> <span class="state">{h.status}</span>
              {h.healthMessage ? <span class="muted"> {h.healthMessage}</span> : null}
              {said ? <span class="muted"> · {said}</span> : null}
            </p>
            <Bar label="vCPUs" used={h.usedVcpus} max={h.maxVcpus} unit="" />
            <Bar label="Memory" used={h.usedMemoryMb} max={h.maxMemoryMb} unit="MB" />
            <Bar label="Environments" used={h.usedEnvironments} max={h.maxEnvironments} unit="" />
            {pools.filter((p) => p.hostId === h.id && (p.size > 0 || p.ready + p.filling + p.draining > 0)).map((p) => (
              <p key={p.id} class="pool" aria-label={`Warm pool of ${h.name}, ${p.vcpus} vCPUs, ${p.memoryMb} MB`}>
                Warm pool of {p.vcpus} vCPU · {p.memoryMb} MB · {p.diskGb} GB: {p.ready} ready of {p.size}
                {p.filling ? `, ${p.filling} booting` : ""}
                {p.draining ? `, ${p.draining} draining` : ""}
                {p.lastError ? <span class="muted"> · last fill failed: {p.lastError}</span> : null}
              </p>
            ))}
            <div class="actions">
              {h.status === "ready" ? <button onClick={() => set(h, "drain")}>Drain {h.name}</button> : <button onClick={() => set(h, "ready")}>Make {h.name} ready</button>}
            </div>
          </article>
        );
      })}
    </section>
  );
}

type Overrides = Schemas["QuotaOverrides"];
const quotaFields: [keyof Overrides, string][] = [
  ["maxEnvironments", "Environments"],
  ["maxConcurrentEnvironments", "Running at once"],
  ["maxVcpus", "vCPUs"],
  ["maxMemoryMb", "Memory (MB)"],
  ["maxDiskGb", "Disk (GB)"],
  ["maxDurationHours", "Duration (hours)"],
];

/** One user's quota: each field blank for the tier's value, or a number of the admin's. */
function QuotaEditor({ user, onDone }: { user: User; onDone: () => void }) {
  const [view, setView] = useState<Schemas["UserQuotaView"] | null>(null);
  const [values, setValues] = useState<Record<string, string>>({});
  const [error, setError] = useState("");
  const [saved, setSaved] = useState(false);
  const show = (v: Schemas["UserQuotaView"]) => {
    setView(v);
    setValues(Object.fromEntries(quotaFields.map(([k]) => [k, v.quotaOverrides[k] == null ? "" : String(v.quotaOverrides[k])])));
  };
  useEffect(() => {
    call<Schemas["UserQuotaView"]>("GET", `/v1/admin/users/${user.id}`).then(show).catch((e) => setError(message(e)));
  }, [user.id]);
  async function save(e: Event) {
    e.preventDefault();
    setError("");
    setSaved(false);
    const quota = Object.fromEntries(quotaFields.map(([k]) => [k, values[k]?.trim() ? Number(values[k]) : null])) as Overrides;
    try {
      show(await call<Schemas["UserQuotaView"]>("PATCH", `/v1/admin/users/${user.id}`, { quota }));
      setSaved(true);
    } catch (err) {
      setError(message(err));
    }
  }
  if (!view) return error ? <Alert error={error} /> : <p aria-busy="true">Loading…</p>;
  return (
    <form onSubmit={save} aria-label={`Quota of ${user.email}`} class="quota-form">
      <p class="muted">Blank means the {view.user.tier} tier's value, shown greyed.</p>
      <div class="quota">
        {quotaFields.map(([k, label]) => (
          <label key={k}>
            {label}
            <input name={k} type="number" min={0} max={10000000} placeholder={String(view.quota[k as keyof typeof view.quota] ?? "")} value={values[k] ?? ""}
              onInput={(e) => setValues({ ...values, [k]: e.currentTarget.value })} />
          </label>
        ))}
      </div>
      <div class="actions">
        <button type="submit">Save quota</button>
        <button type="button" onClick={onDone}>Close</button>
        {saved ? <span role="status">Saved.</span> : null}
      </div>
      <Alert error={error} />
    </form>
  );
}

function AdminUsers() {
  const [users, setUsers] = useState<User[]>([]);
  const [email, setEmail] = useState("");
  const [tier, setTier] = useState("free");
  const [link, setLink] = useState("");
  const [editing, setEditing] = useState<string | null>(null);
  const [error, setError] = useState("");
  const load = () => call<{ items: User[] }>("GET", "/v1/admin/users").then((u) => setUsers(u.items)).catch((e) => setError(message(e)));
  useEffect(() => {
    load();
  }, []);
  async function invite(userId: string, purpose: "invite" | "reset") {
    setError("");
    try {
      const l = await call<Schemas["PasswordLinkView"]>("POST", `/v1/admin/users/${userId}/password-link`, { purpose });
      setLink(`${location.origin}/ui/password?token=${l.token}`);
    } catch (e) {
      setError(message(e));
    }
  }
  async function create(e: Event) {
    e.preventDefault();
    setError("");
    try {
      const made = await call<Schemas["NewUserView"]>("POST", "/v1/admin/users", { email, tier });
      setEmail("");
      await invite(made.user.id, "invite");
      load();
    } catch (err) {
      setError(message(err));
    }
  }
  async function patch(u: User, body: Schemas["PatchUserBody"]) {
    setError("");
    try {
      await call("PATCH", `/v1/admin/users/${u.id}`, body);
      load();
    } catch (e) {
      setError(message(e));
    }
  }
  return (
    <section class="card" aria-labelledby="users">
      <h2 id="users">Users</h2>
      <table>
        <thead>
          <tr><th scope="col">Email</th><th scope="col">Tier</th><th scope="col">Role</th><th scope="col"><span class="sr">Actions</span></th></tr>
        </thead>
        <tbody>
          {users.map((u) => [
            <tr key={u.id}>
              <td>{u.email}</td>
              <td>
                <select aria-label={`Tier of ${u.email}`} value={u.tier} onChange={(e) => patch(u, { tier: e.currentTarget.value as User["tier"] })}>
                  {["free", "pro", "unlimited"].map((t) => <option key={t} value={t}>{t}</option>)}
                </select>
              </td>
              <td>
                <select aria-label={`Role of ${u.email}`} value={u.role} onChange={(e) => patch(u, { role: e.currentTarget.value as User["role"] })}>
                  {["user", "admin"].map((r) => <option key={r} value={r}>{r}</option>)}
                </select>
              </td>
              <td class="actions">
                <button class="small" onClick={() => invite(u.id, "reset")} aria-label={`Password link for ${u.email}`}>Password link</button>
                <button class="small" onClick={() => setEditing(editing === u.id ? null : u.id)} aria-expanded={editing === u.id} aria-label={`Quota of ${u.email}`}>Quota</button>
              </td>
            </tr>,
            editing === u.id ? (
              <tr key={`${u.id}-quota`}>
                <td colSpan={4}><QuotaEditor user={u} onDone={() => setEditing(null)} /></td>
              </tr>
            ) : null,
          ])}
        </tbody>
      </table>
      <form class="inline" onSubmit={create}>
        <label>Invite by email<input type="email" name="invite-email" required value={email} onInput={(e) => setEmail(e.currentTarget.value)} /></label>
        <label>Tier
          <select name="invite-tier" value={tier} onChange={(e) => setTier(e.currentTarget.value)}>
            {["free", "pro", "unlimited"].map((t) => <option key={t} value={t}>{t}</option>)}
          </select>
        </label>
        <button type="submit">Invite</button>
      </form>
      {link ? <p>Send this link (it works once): <code data-testid="password-link">{link}</code></p> : null}
      <Alert error={error} />
    </section>
  );
}

function AdminJobs() {
  const [state, setState] = useState("dead");
  const [jobs, setJobs] = useState<Job[]>([]);
  const [error, setError] = useState("");
  const load = () => call<{ items: Job[] }>("GET", `/v1/admin/jobs?state=${state}`).then((j) => setJobs(j.items)).catch((e) => setError(message(e)));
  useEffect(() => {
    load();
  }, [state]);
  async function retry(j: Job) {
    try {
      await call("POST", `/v1/admin/jobs/${j.id}/retry`);
      load();
    } catch (e) {
      setError(message(e));
    }
  }
  return (
    <section class="card" aria-labelledby="jobs">
      <h2 id="jobs">Jobs</h2>
      <label>State
        <select value={state} onChange={(e) => setState(e.currentTarget.value)}>
          {["queued", "running", "succeeded", "dead"].map((s) => <option key={s} value={s}>{s}</option>)}
        </select>
      </label>
      <Alert error={error} />
      <table>
        <thead>
          <tr><th scope="col">Id</th><th scope="col">Kind</th><th scope="col">Environment</th><th scope="col">Attempts</th><th scope="col">Last error</th><th scope="col"><span class="sr">Actions</span></th></tr>
        </thead>
        <tbody>
          {jobs.map((j) => (
            <tr key={j.id}>
              <td>{j.id}</td>
              <td>{j.kind}</td>
              <td>{j.environmentId}</td>
              <td>{j.attempts} of {j.maxAttempts}</td>
              <td>{j.lastError ?? ""}</td>
              <td>{j.state === "dead" ? <button class="small" onClick={() => retry(j)} aria-label={`Retry job ${j.id}`}>Retry</button> : null}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function AdminAudit() {
  const [filter, setFilter] = useState<Record<string, string>>({});
  const [items, setItems] = useState<Audit[]>([]);
  const [error, setError] = useState("");
  useEffect(() => {
    const q = new URLSearchParams(Object.entries(filter).filter(([, v]) => v.trim()));
    q.set("limit", "100");
    call<{ items: Audit[] }>("GET", `/v1/admin/audit?${q}`).then((a) => setItems(a.items)).catch((e) => setError(message(e)));
  }, [filter]);
  function apply(e: Event) {
    e.preventDefault();
    const form = new FormData(e.currentTarget as HTMLFormElement);
    setFilter(Object.fromEntries([...form.entries()].map(([k, v]) => [k, String(v)])));
  }
  return (
    <section class="card" aria-labelledby="audit">
      <h2 id="audit">Audit</h2>
      <form class="inline" onSubmit={apply} aria-label="Filter the audit log">
        <label>Actor<input name="actor" /></label>
        <label>Action<input name="action" /></label>
        <label>Outcome<input name="outcome" /></label>
        <button type="submit">Filter</button>
      </form>
      <Alert error={error} />
      <table>
        <thead>
          <tr><th scope="col">When</th><th scope="col">Actor</th><th scope="col">Action</th><th scope="col">Environment</th><th scope="col">States</th><th scope="col">Outcome</th></tr>
        </thead>
        <tbody>
          {items.map((a) => (
            <tr key={a.id}>
              <td>{new Date(a.at).toLocaleString()}</td>
              <td>{a.actor}</td>
              <td>{a.action}</td>
              <td>{a.environmentId ?? ""}</td>
              <td>{a.previousState ?? ""}{a.newState ? ` → ${a.newState}` : ""}</td>
              <td>{a.outcome}{a.error ? `: ${a.error}` : ""}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

type AdminTab = "vms" | "hosts" | "users" | "jobs" | "audit";

function Admin() {
  const [tab, setTab] = useState<AdminTab>("vms");
  const tabs: [AdminTab, string][] = [["vms", "VMs"], ["hosts", "Hosts"], ["users", "Users"], ["jobs", "Jobs"], ["audit", "Audit"]];
  return (
    <>
      <div class="tabs" role="tablist" aria-label="Administration">
        {tabs.map(([t, label]) => (
          <button key={t} role="tab" aria-selected={tab === t} onClick={() => setTab(t)}>{label}</button>
        ))}
      </div>
      <div role="tabpanel">
        {tab === "vms" ? <AdminVms /> : tab === "hosts" ? <AdminHosts /> : tab === "users" ? <AdminUsers /> : tab === "jobs" ? <AdminJobs /> : <AdminAudit />}
      </div>
    </>
  );
}

type Page = "vm" | "environments" | "settings" | "admin";
const paths: Record<Page, string> = { vm: "/", environments: "/ui/environments", settings: "/ui/settings", admin: "/ui/admin" };
const pageOf = (path: string): Page =>
  path === "/ui/settings" ? "settings" : path === "/ui/admin" ? "admin" : path.startsWith("/ui/environments") ? "environments" : "vm";
/** The environment a path names (`/ui/environments/{id}`). */
const environmentOf = (path: string): string | null => path.match(/^\/ui\/environments\/([^/]+)$/)?.[1] ?? null;

function App() {
  const [user, setUser] = useState<User | null | undefined>(undefined);
  const [link, setLink] = useState(location.pathname === "/ui/password" ? new URLSearchParams(location.search).get("token") : null);
  const [page, setPage] = useState<Page>(pageOf(location.pathname));
  const [environment, setEnvironment] = useState<string | null>(environmentOf(location.pathname));
  useEffect(() => {
    const back = () => {
      setPage(pageOf(location.pathname));
      setEnvironment(environmentOf(location.pathname));
    };
    window.addEventListener("popstate", back);
    return () => window.removeEventListener("popstate", back);
  }, []);
  useEffect(() => {
    call<Session>("GET", "/v1/auth/session")
      .then((s) => {
        setCsrf(s.csrfToken);
        setUser(s.user);
      })
      .catch(() => setUser(null));
  }, []);
  if (link) return <SetPassword token={link} onDone={() => setLink(null)} />;
  if (user === undefined) return <p aria-busy="true">Loading…</p>;
  if (user === null)
    return (
      <SignIn
        onSignedIn={(s) => {
          setCsrf(s.csrfToken);
          setUser(s.user);
        }}
      />
    );
  async function signOut() {
    await call("POST", "/v1/auth/sign-out").catch(() => undefined);
    setUser(null);
  }
  function go(e: Event, to: Page) {
    e.preventDefault();
    history.pushState(null, "", paths[to]);
    setPage(to);
    setEnvironment(null);
  }
  function openEnvironment(id: string | null) {
    history.pushState(null, "", id ? `/ui/environments/${id}` : "/ui/environments");
    setPage("environments");
    setEnvironment(id);
  }
  const links: [Page, string][] = [["vm", "My VM"], ["environments", "Environments"], ["settings", "Settings"]];
  if (user.role === "admin") links.push(["admin", "Admin"]);
  return (
    <>
      <header>
        <strong class="brand">Hearth</strong>
        <nav aria-label="Main">
          {links.map(([p, label]) => (
            <a key={p} href={paths[p]} aria-current={page === p ? "page" : undefined} onClick={(e) => go(e, p)}>{label}</a>
          ))}
        </nav>
        <span class="who">{user.email}</span>
        <button class="small" onClick={signOut}>Sign out</button>
      </header>
      <main>
        {page === "settings" ? (
          <Settings />
        ) : page === "admin" ? (
          <Admin />
        ) : page === "environments" ? (
          environment ? <EnvironmentPage id={environment} back={() => openEnvironment(null)} /> : <Environments open={openEnvironment} />
        ) : (
          <MyVm />
        )}
      </main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
