// The seed's tRPC surface, driven by the real @trpc/client v11 as the seed's front end
// drives it: queries batched by httpBatchLink (counted: three queries, one request),
// mutations, and executeCodeStream through httpSubscriptionLink (server-sent events).
// Invalid input must give BAD_REQUEST, getAllVms for a normal user FORBIDDEN.
//
// Run by crates/hearth/tests/trpc.rs with HEARTH_URL, TOKEN (a user) and ADMIN_TOKEN set.
import { createTRPCUntypedClient, httpBatchLink, httpSubscriptionLink, splitLink, TRPCClientError } from "@trpc/client";
import { EventSource } from "eventsource";

const url = `${process.env.HEARTH_URL}/api/trpc`;
const step = (what) => console.log(`trpc: ${what}`);
let requests = 0;

function client(token) {
  const authorized = (input, init = {}) => {
    requests += 1;
    const headers = new Headers(init.headers);
    headers.set("authorization", `Bearer ${token}`);
    return fetch(input, { ...init, headers });
  };
  return createTRPCUntypedClient({
    links: [
      splitLink({
        condition: (op) => op.type === "subscription",
        true: httpSubscriptionLink({ url, EventSource, eventSourceOptions: { fetch: authorized } }),
        false: httpBatchLink({ url, fetch: authorized }),
      }),
    ],
  });
}

function assert(ok, what) {
  if (!ok) throw new Error(what);
}

/** The tRPC error code a call fails with. */
async function failure(call) {
  try {
    await call;
  } catch (e) {
    assert(e instanceof TRPCClientError, `not a TRPCClientError: ${e}`);
    return e.data?.code;
  }
  throw new Error("the call succeeded");
}

async function until(what, check, ms = 180_000) {
  const started = Date.now();
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() - started > ms) throw new Error(`${what} did not happen within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

const user = client(process.env.TOKEN);
const admin = client(process.env.ADMIN_TOKEN);

step("three queries in one batch");
requests = 0;
const [mine, regions, flavors] = await Promise.all([
  user.query("vm.getMyVm"),
  user.query("vm.listRegions"),
  user.query("vm.listFlavors"),
]);
assert(requests === 1, `the three queries took ${requests} requests`);
assert(mine === null, `getMyVm without a VM: ${JSON.stringify(mine)}`);
assert(Array.isArray(regions), "listRegions is a list");
assert(flavors.length >= 3 && flavors.every((f) => f.vcpus > 0 && f.ram > 0), `flavors: ${JSON.stringify(flavors)}`);

step("invalid input and a normal user's admin call");
assert((await failure(user.mutation("vm.provisionMyVm", { vcpus: 99 }))) === "BAD_REQUEST", "vcpus 99");
assert((await failure(user.mutation("vm.provisionMyVm", { memoryMb: 512 }))) === "BAD_REQUEST", "memoryMb 512");
assert((await failure(user.mutation("vm.executeCode", {}))) === "BAD_REQUEST", "executeCode without code");
assert((await failure(user.query("vm.getAllVms"))) === "FORBIDDEN", "getAllVms as a user");
assert((await failure(user.mutation("vm.startMyVm"))) === "NOT_FOUND", "startMyVm without a VM");

step("provision");
const made = await user.mutation("vm.provisionMyVm", { vcpus: 1, memoryMb: 1024, diskGb: 10 });
assert(made.vcpus === 1 && made.memoryMb === 1024 && made.diskGb === 10, `provisioned: ${JSON.stringify(made)}`);
const vm = await until("running", async () => {
  const v = await user.query("vm.getMyVm");
  return v?.status === "running" ? v : null;
});
const logs = await user.query("vm.getProvisionLogs");
assert(logs.length > 0 && logs.every((l) => l.timestamp && l.message && l.level), `logs: ${JSON.stringify(logs)}`);

step("executeCode");
const ran = await user.mutation("vm.executeCode", { code: "echo hi; exit 4" });
assert(ran.stdout === "hi\n" && ran.exitCode === 4, `executeCode: ${JSON.stringify(ran)}`);

step("executeCodeStream");
const events = await new Promise((resolve, reject) => {
  const seen = [];
  const sub = user.subscription("vm.executeCodeStream", { command: "echo out; echo err >&2; exit 3" }, {
    onData: (e) => {
      seen.push(e);
      if (e.type === "exit" || e.type === "error") {
        sub.unsubscribe();
        resolve(seen);
      }
    },
    onError: reject,
  });
  setTimeout(() => reject(new Error(`no exit event: ${JSON.stringify(seen)}`)), 60_000);
});
const out = events.filter((e) => e.type === "stdout").map((e) => e.data).join("");
const err = events.filter((e) => e.type === "stderr").map((e) => e.data).join("");
const exit = events.find((e) => e.type === "exit");
assert(out === "out\n" && err === "err\n" && exit?.code === 3, `stream: ${JSON.stringify(events)}`);
const refused = await new Promise((resolve) => {
  const sub = user.subscription("vm.executeCodeStream", {}, {
    onData: () => undefined,
    onError: (e) => {
      sub.unsubscribe();
      resolve(e.data?.code);
    },
  });
});
assert(refused === "BAD_REQUEST", `executeCodeStream without a command: ${refused}`);

step("the admin's view");
const all = await admin.query("vm.getAllVms");
assert(all.vms.some((v) => v.id === vm.id) && all.stats.running >= 1 && Array.isArray(all.hosts), `getAllVms: ${JSON.stringify(all.stats)}`);

step("stop and destroy");
await user.mutation("vm.stopMyVm");
await until("stopped", async () => (await user.query("vm.getMyVm"))?.status === "stopped");
const stopped = await user.mutation("vm.executeCode", { code: "true" });
assert(stopped.exitCode === 1 && stopped.stderr.length > 0, `executeCode on a stopped VM: ${JSON.stringify(stopped)}`);
await until("running again (executeCode queued a start)", async () => (await user.query("vm.getMyVm"))?.status === "running");
const gone = await user.mutation("vm.destroyMyVm");
assert(gone.success === true, `destroyMyVm: ${JSON.stringify(gone)}`);
await until("destroyed", async () => {
  const v = await user.query("vm.getMyVm");
  return v === null || v.status === "destroyed";
});
step("done");
