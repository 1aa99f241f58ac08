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
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
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
      await call("POST", "/v1/me/vm", { vcpus: f.vcpus, memoryMb: f.memoryMb, diskGb: f.diskGb });
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

function VmCard({ vm, onChanged }: { vm: UserVm; onChanged: () => void }) {
  const [log, setLog] = useState<LogLine[]>([]);
  const [state, setState] = useState(vm.status);
  const [error, setError] = useState("");
  const [terminal, setTerminal] = useState(false);
  useEffect(() => setState(vm.status), [vm.status, vm.generation]);
  useEffect(() => {
    const events = new EventSource(`/v1/environments/${vm.environmentId}/events`);
    events.addEventListener("log", (e) => setLog((l) => [...l.slice(-499), JSON.parse((e as MessageEvent).data)]));
    events.addEventListener("state", (e) => {
      setState(JSON.parse((e as MessageEvent).data).state);
      onChanged();
    });
    return () => events.close();
  }, [vm.environmentId]);
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
  const ssh = vm.sshPort ? `ssh -p ${vm.sshPort} ${vm.sshUser}@${vm.sshHost}` : "";
  return (
    <>
      <section class="card" aria-labelledby="vm">
        <h2 id="vm">Your VM</h2>
        <p>
          <span class={`state state-${state}`} data-testid="state">{state}</span>
          {vm.stateMessage ? <span class="muted"> {vm.stateMessage}</span> : null}
        </p>
        <dl class="facts">
          <dt>Size</dt>
          <dd>{vm.vcpus} vCPU · {vm.memoryMb} MB · {vm.diskGb} GB</dd>
          <dt>Runtime</dt>
          <dd>{vm.totalRuntimeMinutes} min</dd>
          {ssh ? (
            <>
              <dt>SSH</dt>
              <dd>
                <code>{ssh}</code> <button class="small" onClick={() => navigator.clipboard?.writeText(ssh)}>Copy</button>
              </dd>
            </>
          ) : null}
        </dl>
        <div class="actions">
          <button onClick={() => act("POST", "/v1/me/vm/start")} disabled={state !== "stopped"}>Start</button>
          <button onClick={() => act("POST", "/v1/me/vm/stop")} disabled={!running}>Stop</button>
          <button class="danger" onClick={() => act("DELETE", "/v1/me/vm", "Destroy your VM? Its disk is deleted.")}>Destroy</button>
          <button onClick={() => setTerminal((t) => !t)} disabled={!running} aria-pressed={terminal}>Terminal</button>
        </div>
        <Alert error={error} />
      </section>
      {terminal && running ? <TerminalView environmentId={vm.environmentId} /> : null}
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

/** API tokens: make, name, see when last used, revoke. */
function Settings() {
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

type Vms = Schemas["VmsView"];

/** The seed's admin view: counts, then every personal VM with its owner. */
function Admin() {
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
  useEffect(() => {
    load();
    const every = setInterval(load, 3000);
    return () => clearInterval(every);
  }, []);
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
      <section class="card" aria-labelledby="all">
        <h2 id="all">All VMs</h2>
        <table>
          <thead>
            <tr><th scope="col">Owner</th><th scope="col">State</th><th scope="col">Size</th><th scope="col">Runtime</th><th scope="col"><span class="sr">Actions</span></th></tr>
          </thead>
          <tbody>
            {vms.vms.map((vm) => (
              <tr key={vm.id} data-owner={emails[vm.userId] ?? vm.userId}>
                <td>{emails[vm.userId] ?? vm.userId}</td>
                <td><span class={`state state-${vm.status}`}>{vm.status}</span></td>
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

type Page = "vm" | "settings" | "admin";
const paths: Record<Page, string> = { vm: "/", settings: "/ui/settings", admin: "/ui/admin" };
const pageOf = (path: string): Page => (path === "/ui/settings" ? "settings" : path === "/ui/admin" ? "admin" : "vm");

function App() {
  const [user, setUser] = useState<User | null | undefined>(undefined);
  const [link, setLink] = useState(location.pathname === "/ui/password" ? new URLSearchParams(location.search).get("token") : null);
  const [page, setPage] = useState<Page>(pageOf(location.pathname));
  useEffect(() => {
    const back = () => setPage(pageOf(location.pathname));
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
  }
  const links: [Page, string][] = [["vm", "My VM"], ["settings", "Settings"]];
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
      <main>{page === "settings" ? <Settings /> : page === "admin" ? <Admin /> : <MyVm />}</main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
