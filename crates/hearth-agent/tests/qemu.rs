//! The `qemu` backend with real QEMU (software emulation) and the VM image that
//! `hearth image build --vm` made (`make test` builds it): a VM boots its own kernel, has
//! the disk it asked for, pauses, stops, starts, is adopted by a new agent, is reported when
//! it dies, and leaves nothing behind.

use hearth_agent::image::VmImage;
use hearth_agent::qemu::QemuHost;
use hearth_agent::qmp::Qmp;
use hearth_agent::vmm::{Accel, VmSpec, VmStatus, Vmm};
use hearth_guest::{ExecRequest, KeyPair, SshPool, Target};
use std::collections::BTreeMap;
use std::time::Duration;

fn image() -> VmImage {
    let dir = std::env::var("HEARTH_VM_IMAGE_DIR")
        .unwrap_or_else(|_| hearth_agent::DEFAULT_VM_IMAGE_DIR.into());
    VmImage::open(std::path::Path::new(&dir))
        .expect("the VM image: run `hearth image build --vm` (make test does)")
}

async fn run(pool: &SshPool, target: &Target, code: &str) -> String {
    let req = ExecRequest {
        code: code.into(),
        code_on_stdin: true,
        working_dir: None,
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout: Duration::from_secs(60),
        max_output: 65536,
    };
    let out = pool.exec(target, &req).await.expect("exec");
    assert_eq!(
        out.exit_code,
        Some(0),
        "{code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The command lines of the QEMU processes running VM `name`.
fn command_lines(name: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let args: Vec<String> = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .map(str::to_string)
                .collect();
            if args.iter().any(|a| *a == format!("{name},process={name}")) {
                found.push(args);
            }
        }
    }
    found
}

/// Kills, when dropped, every QEMU whose files are under its directory (the test's state):
/// VMs outlive their host by design, and a failed test must leave none running.
struct KillVmsUnder(std::path::PathBuf);

impl Drop for KillVmsUnder {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with(hearth_agent::qemu::QEMU)
                && cmdline.contains(&dir)
                && let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
            {
                // SAFETY: kill(2) on a QEMU running this test's files.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// QEMU processes running VM `name`.
fn processes(name: &str) -> usize {
    command_lines(name).len()
}

/// QEMU processes running VM `name` from files under `dir` (another test's agent may use
/// the same base snapshot name).
fn processes_under(name: &str, dir: &std::path::Path) -> usize {
    let dir = dir.display().to_string();
    command_lines(name)
        .iter()
        .filter(|args| args.iter().any(|a| a.contains(&dir)))
        .count()
}

#[tokio::test]
async fn a_vm_boots_its_own_kernel_and_lives_its_whole_life() {
    let image = image();
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsUnder(state.path().to_path_buf());
    let host = QemuHost::new(
        state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap();
    let keys = KeyPair::generate();
    let name = format!("hearth-test-{}", std::process::id());
    let spec = VmSpec {
        name: name.clone(),
        environment_id: "test".into(),
        hostname: "vm-one".into(),
        vcpus: 1,
        memory_mb: 512,
        disk_gb: 3,
        authorized_keys: keys.public_openssh.clone(),
        labels: BTreeMap::new(),
        snapshot: None,
        image: None,
    };
    let record = host.create(&spec).await.unwrap();
    // An image with the MMIO transport boots on the microvm machine.
    let machine = command_lines(&name)[0]
        .iter()
        .skip_while(|a| *a != "-machine")
        .nth(1)
        .cloned();
    assert_eq!(
        machine.as_deref(),
        Some(if image.mmio { "microvm,acpi=on" } else { "pc" })
    );
    let pool = SshPool::new();
    let target = Target {
        environment_id: name.clone(),
        host: "127.0.0.1".into(),
        port: record.ssh_port,
        user: "dev".into(),
        private_key_openssh: keys.private_openssh.clone(),
        host_key: None,
    };
    pool.wait_ready(&target, Duration::from_secs(120))
        .await
        .expect("SSH answers");

    // Its own kernel, its own name, the disk it asked for, and root through sudo.
    assert_eq!(run(&pool, &target, "uname -r").await, image.kernel_version);
    assert_ne!(
        image.kernel_version,
        String::from_utf8_lossy(
            &std::process::Command::new("uname")
                .arg("-r")
                .output()
                .unwrap()
                .stdout
        )
        .trim()
    );
    assert_eq!(run(&pool, &target, "hostname").await, "vm-one");
    // On microvm the guest keeps time by the TSC whose rate the agent gave it.
    if image.mmio {
        let clock = run(
            &pool,
            &target,
            "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .await;
        assert_eq!(clock, "tsc");
    }
    assert_eq!(
        run(&pool, &target, "df -BG --output=size / | tail -1").await,
        "3G"
    );
    assert_eq!(run(&pool, &target, "sudo -n id -u").await, "0");

    // The same name again is the same VM: no second QEMU.
    assert_eq!(host.create(&spec).await.unwrap(), record);
    assert_eq!(processes(&name), 1);

    host.pause(&name).await.unwrap();
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Paused));
    host.resume(&name).await.unwrap();
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Running));

    // An agent killed while a snapshot had the VM paused (its marker left behind): the
    // next one resumes it.
    host.pause(&name).await.unwrap();
    let marker = state
        .path()
        .join("vms")
        .join(&name)
        .join("paused-for-snapshot");
    std::fs::write(&marker, b"").unwrap();
    assert_eq!(
        host.status(&name).await.unwrap(),
        Some(VmStatus::Running),
        "a snapshot's pause is not a state of the VM's"
    );

    // A new agent on the same state adopts the running VM instead of starting another.
    let again = QemuHost::new(
        state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap();
    again.recover().await;
    assert!(!marker.exists());
    let listed = again.list().await.unwrap();
    assert_eq!(listed, vec![(record.clone(), VmStatus::Running)]);
    assert_eq!(processes(&name), 1);

    host.stop(&name).await.unwrap();
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Stopped));
    assert_eq!(processes(&name), 0);
    host.start(&name).await.unwrap();
    pool.forget(&name).await;
    pool.wait_ready(&target, Duration::from_secs(120))
        .await
        .expect("SSH answers after a start");
    // What was written survives the stop (the overlay keeps it).
    run(&pool, &target, "echo kept > ~/note && sync").await;

    // Killed behind the agent's back: reported as stopped, and a start brings it back.
    let pid: i32 = std::fs::read_to_string(state.path().join("vms").join(&name).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the pid QEMU wrote for this test's VM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        again.list().await.unwrap(),
        vec![(record.clone(), VmStatus::Stopped)]
    );
    again.start(&name).await.unwrap();
    pool.forget(&name).await;
    pool.wait_ready(&target, Duration::from_secs(120))
        .await
        .expect("SSH answers after the crash");
    assert_eq!(run(&pool, &target, "cat ~/note").await, "kept");

    // Destroy leaves no process and no file; destroying again is fine.
    pool.forget(&name).await;
    host.destroy(&name).await.unwrap();
    assert_eq!(processes(&name), 0);
    assert!(!state.path().join("vms").join(&name).exists());
    assert_eq!(host.status(&name).await.unwrap(), None);
    host.destroy(&name).await.unwrap();
}

fn spec(name: &str, hostname: &str, keys: &KeyPair) -> VmSpec {
    VmSpec {
        name: name.into(),
        environment_id: "test".into(),
        hostname: hostname.into(),
        vcpus: 1,
        memory_mb: 512,
        disk_gb: 3,
        authorized_keys: keys.public_openssh.clone(),
        labels: BTreeMap::new(),
        snapshot: None,
        image: None,
    }
}

fn target(name: &str, port: u16, keys: &KeyPair) -> Target {
    Target {
        environment_id: name.into(),
        host: "127.0.0.1".into(),
        port,
        user: "dev".into(),
        private_key_openssh: keys.private_openssh.clone(),
        host_key: None,
    }
}

/// What makes a guest itself: its hostname, MAC, machine id, SSH host key, and the first
/// bytes its random generator gives.
async fn identity(pool: &SshPool, target: &Target) -> [String; 5] {
    let read = |code: &'static str| run(pool, target, code);
    [
        read("hostname").await,
        read("cat /sys/class/net/eth0/address").await,
        read("cat /etc/machine-id").await,
        read("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").await,
        read("od -An -N16 -tx1 /dev/urandom | tr -d ' '").await,
    ]
}

/// The `qemu` backend with base snapshots: the first VM of a size boots while the snapshot
/// is built; the next ones restore it. Side by side, a cold-booted and two restored guests
/// of one image: each has its own hostname, MAC, machine id, host key and random stream,
/// the clock is right, only its own key logs in; a restored VM stopped and started boots
/// from its own disk and keeps what it wrote; a restore killed half-way (the agent died)
/// leaves no QEMU behind once an agent opens the state again, nor does a build.
#[tokio::test]
async fn restored_vms_take_their_own_identity() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("hearth_agent=info")
        .with_test_writer()
        .try_init();
    let image = image();
    assert!(image.mmio, "base snapshots need the microvm image");
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsUnder(state.path().to_path_buf());
    let open = || {
        QemuHost::new(
            state.path().to_path_buf(),
            image.clone(),
            Accel::Tcg,
            "127.0.0.1",
        )
        .unwrap()
        .with_base_snapshots(state.path())
        .unwrap()
    };
    let host = open();
    let base = host.base_snapshots().unwrap().clone();
    let pool = SshPool::new();
    let pid = std::process::id();

    // The first VM of its size boots, and starts the base snapshot's build.
    let cold_keys = KeyPair::generate();
    let cold_name = format!("hearth-cold-{pid}");
    let cold_spec = spec(&cold_name, "vm-cold", &cold_keys);
    assert!(base.ready(&cold_spec).is_none());
    let cold = host.create(&cold_spec).await.unwrap();
    assert_eq!(cold.restored_from, None);
    assert!(base.is_building());
    let cold_target = target(&cold_name, cold.ssh_port, &cold_keys);
    pool.wait_ready(&cold_target, Duration::from_secs(240))
        .await
        .expect("the cold VM's SSH answers");
    let started = std::time::Instant::now();
    while base.is_building() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the base snapshot took over 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snapshot = base.ready(&cold_spec).expect("the base snapshot was built");
    assert!(snapshot.memory().is_file() && snapshot.disk().is_file());
    assert!(
        !std::fs::read_dir(state.path().join("base-snapshots"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with('.')),
        "the build left its working directory"
    );
    assert_eq!(
        processes_under(
            &format!("hearth-base-{}", snapshot.id.rsplit_once('-').unwrap().0),
            state.path()
        ),
        0,
        "the base VM still runs"
    );

    // Two VMs restore it, each taking the identity its config drive gives.
    let mut restored = Vec::new();
    for n in 0..2 {
        let keys = KeyPair::generate();
        let name = format!("hearth-restored-{n}-{pid}");
        let record = host
            .create(&spec(&name, &format!("vm-restored-{n}"), &keys))
            .await
            .unwrap();
        assert_eq!(record.restored_from.as_deref(), Some(snapshot.id.as_str()));
        let target = target(&name, record.ssh_port, &keys);
        pool.wait_ready(&target, Duration::from_secs(60))
            .await
            .expect("the restored VM's SSH answers");
        restored.push((name, record, keys, target));
    }
    let cold_identity = identity(&pool, &cold_target).await;
    let identities = [
        identity(&pool, &restored[0].3).await,
        identity(&pool, &restored[1].3).await,
    ];
    assert_eq!(cold_identity[0], "vm-cold");
    for (n, id) in identities.iter().enumerate() {
        assert_eq!(id[0], format!("vm-restored-{n}"));
        assert_eq!(
            Some(&id[1]),
            restored[n].1.mac.as_ref(),
            "the MAC is the record's"
        );
        assert_eq!(id[2].len(), 32, "machine id {:?}", id[2]);
        for field in 1..5 {
            assert_ne!(
                id[field], cold_identity[field],
                "field {field} equals the cold VM's"
            );
        }
    }
    let pairs = identities[0].iter().zip(&identities[1]);
    for (field, (first, second)) in pairs.enumerate().take(5).skip(1) {
        assert_ne!(
            first, second,
            "field {field} is shared by two restores of one snapshot"
        );
    }
    // The restored guest's clock was set when it woke (it slept since the snapshot).
    let guest_now: i64 = run(&pool, &restored[0].3, "date +%s")
        .await
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - now).abs() <= 5,
        "guest {guest_now}, host {now}"
    );
    // Only its own key logs in: not the cold VM's, not another restore's.
    let foreign = Target {
        private_key_openssh: cold_keys.private_openssh.clone(),
        environment_id: format!("{}-foreign", restored[0].0),
        ..restored[0].3.clone()
    };
    assert!(pool.probe(&foreign, Duration::from_secs(10)).await.is_err());

    // Stopped and started, a restored VM boots from its own disk: what it wrote and its
    // host key stay.
    let (name, _, _, target) = &restored[0];
    run(&pool, target, "echo kept > ~/note && sync").await;
    host.stop(name).await.unwrap();
    host.start(name).await.unwrap();
    pool.forget(name).await;
    pool.wait_ready(target, Duration::from_secs(240))
        .await
        .expect("SSH answers after a start");
    assert_eq!(run(&pool, target, "cat ~/note").await, "kept");
    assert_eq!(identity(&pool, target).await[3], identities[0][3]);

    // Restores cut short once their QEMU runs. A caller that gives up (the create's future
    // dropped) takes the QEMU and the directory with it; an agent that dies (no destructor
    // runs: the future is forgotten) leaves both, and the next agent removes them.
    let killed_name = format!("hearth-killed-{pid}");
    let killed_spec = spec(&killed_name, "vm-killed", &KeyPair::generate());
    let hidden = state.path().join("vms").join(format!(".{killed_name}.new"));
    for dies in [false, true] {
        let host = open();
        let mut creating = Box::pin(host.create(&killed_spec));
        let started = std::time::Instant::now();
        while processes(&killed_name) == 0 {
            assert!(started.elapsed() < Duration::from_secs(30));
            if let Ok(done) = tokio::time::timeout(Duration::from_millis(5), &mut creating).await {
                panic!("the restore ended before it could be cut short: {done:?}");
            }
        }
        if dies {
            std::mem::forget(creating);
            std::mem::forget(host);
            assert_eq!(processes(&killed_name), 1);
            assert!(hidden.exists());
        } else {
            drop(creating);
            assert_eq!(
                processes(&killed_name),
                0,
                "a dropped restore kept its QEMU"
            );
            assert!(!hidden.exists());
        }
    }
    let reopened = open();
    assert_eq!(
        processes(&killed_name),
        0,
        "the half-made VM's QEMU outlived its agent"
    );
    assert!(
        !state
            .path()
            .join("vms")
            .join(format!(".{killed_name}.new"))
            .exists()
    );
    assert_eq!(reopened.status(&killed_name).await.unwrap(), None);

    // A build under way when the agent stops is abandoned with its QEMU.
    let other_keys = KeyPair::generate();
    let other = VmSpec {
        memory_mb: 384,
        ..spec(&format!("hearth-other-{pid}"), "vm-other", &other_keys)
    };
    reopened.create(&other).await.unwrap();
    assert!(reopened.base_snapshots().unwrap().is_building());
    let fingerprint = snapshot.id.split('-').nth(1).unwrap();
    let base_vm = format!("hearth-base-1c384m3g-{fingerprint}");
    let started = std::time::Instant::now();
    while processes_under(&base_vm, state.path()) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no build started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reopened.shutdown();
    assert_eq!(
        processes_under(&base_vm, state.path()),
        0,
        "the build's QEMU outlived the agent"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leftovers: Vec<String> = std::fs::read_dir(state.path().join("base-snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Destroying leaves no process; the snapshot stays for the next VMs.
    for name in [
        cold_name.as_str(),
        restored[0].0.as_str(),
        restored[1].0.as_str(),
        other.name.as_str(),
    ] {
        pool.forget(name).await;
        reopened.destroy(name).await.unwrap();
        assert_eq!(processes(name), 0);
    }
    let again = open();
    assert_eq!(
        again
            .base_snapshots()
            .unwrap()
            .ready(&cold_spec)
            .map(|s| s.id),
        Some(snapshot.id)
    );
}

/// The accelerator is decided by a boot, not by `/dev/kvm`: the probe sees a guest that
/// boots (TCG always works), so a `false` for KVM means KVM's guest did not come up.
#[test]
fn the_probe_sees_a_guest_that_boots() {
    let work = tempfile::tempdir().unwrap();
    assert!(
        hearth_agent::qemu::probe(Accel::Tcg, &image(), work.path()),
        "a TCG guest never printed the probe's marker"
    );
    let log = std::fs::read_to_string(work.path().join("tcg-probe.log")).unwrap();
    assert!(log.contains("Linux version"), "{log}");
}

/// BENCHMARKS.md "QEMU restore against cold boot": from `create` to the first command run
/// over SSH, five VMs each way, interleaved, on one host whose base snapshot is built first.
/// `cargo test -p hearth-agent --test qemu -- --ignored --nocapture benchmark`
#[tokio::test]
#[ignore = "a benchmark: about 2 minutes of software-emulated boots"]
async fn benchmark_restore_against_cold_boot() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("hearth_agent=info")
        .try_init();
    let image = image();
    let restoring_state = tempfile::tempdir().unwrap();
    let booting_state = tempfile::tempdir().unwrap();
    let _cleanup = (
        KillVmsUnder(restoring_state.path().to_path_buf()),
        KillVmsUnder(booting_state.path().to_path_buf()),
    );
    let restoring = QemuHost::new(
        restoring_state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap()
    .with_base_snapshots(restoring_state.path())
    .unwrap();
    let booting = QemuHost::new(
        booting_state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap();
    let pool = SshPool::new();
    let pid = std::process::id();
    let first = spec(
        &format!("hearth-bench-first-{pid}"),
        "first",
        &KeyPair::generate(),
    );
    let started = std::time::Instant::now();
    restoring.create(&first).await.unwrap();
    while restoring.base_snapshots().unwrap().is_building() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = restoring.base_snapshots().unwrap().ready(&first).unwrap();
    println!(
        "base snapshot: built in {:.1} s after the first create (its VM booted in {:.1} s), memory {} MB",
        started.elapsed().as_secs_f64(),
        snapshot.info.boot_ms as f64 / 1000.0,
        snapshot.info.memory_bytes / 1_000_000
    );
    restoring.destroy(&first.name).await.unwrap();
    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for n in 0..5 {
        for (host, times, kind) in [
            (&booting, &mut cold, "cold"),
            (&restoring, &mut restored, "restored"),
        ] {
            let keys = KeyPair::generate();
            let name = format!("hearth-bench-{kind}-{n}-{pid}");
            let started = std::time::Instant::now();
            let record = host.create(&spec(&name, kind, &keys)).await.unwrap();
            let created = started.elapsed().as_secs_f64();
            assert_eq!(record.restored_from.is_some(), kind == "restored");
            let target = target(&name, record.ssh_port, &keys);
            // Ready means the guest ran `true` for the key just given.
            pool.wait_ready(&target, Duration::from_secs(240))
                .await
                .unwrap();
            times.push(started.elapsed().as_secs_f64());
            println!(
                "{kind}: created in {created:.2} s, first exec at {:.2} s",
                started.elapsed().as_secs_f64()
            );
            pool.forget(&name).await;
            host.destroy(&name).await.unwrap();
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, r) = (median(&mut cold), median(&mut restored));
    println!("cold boot to first exec:   p50 {c:.2} s  all {cold:.2?}");
    println!("restore to first exec:     p50 {r:.2} s  all {restored:.2?}");
    println!("restore is {:.1} times faster", c / r);
}

/// BENCHMARKS.md "QEMU: users' snapshots": a running VM whose disk holds 1 GB of random
/// bytes beyond the image; the snapshot (pause, memory saved, `qemu-img convert` of the
/// whole chain, resume) against the same done by hand (QMP `stop`, `migrate` to a file,
/// `qemu-img`, fsync, `cont`) in the same run; then, create to first command, a VM restored
/// from the snapshot's memory, one of another memory size booted from its disk, and a cold
/// boot from the image.
/// `cargo test -p hearth-agent --test qemu -- --ignored --nocapture benchmark_snapshot`
#[tokio::test]
#[ignore = "a benchmark: writes 1 GB in a software-emulated guest"]
async fn benchmark_snapshot_of_a_1gb_disk() {
    let image = image();
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsUnder(state.path().to_path_buf());
    let host = QemuHost::new(
        state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap();
    let pool = SshPool::new();
    let pid = std::process::id();
    let keys = KeyPair::generate();
    let name = format!("hearth-bench-source-{pid}");
    let record = host.create(&spec(&name, "source", &keys)).await.unwrap();
    let source = target(&name, record.ssh_port, &keys);
    pool.wait_ready(&source, Duration::from_secs(240))
        .await
        .unwrap();
    // Random bytes: nothing for qcow2 to leave out.
    run(
        &pool,
        &source,
        "head -c 1000000000 /dev/urandom > ~/blob && sync && echo written",
    )
    .await;
    let disk = state.path().join("vms").join(&name).join("disk.qcow2");
    let mut snapshot_ms = Vec::new();
    let mut raw_ms = Vec::new();
    // Interleaved, the raw copy first: each reads the disk as the other left the page cache.
    // The raw copy pauses the VM too (a running TCG guest takes a core from the copy).
    for n in 0..3 {
        let out = state.path().join(format!("raw-{n}.qcow2"));
        let started = std::time::Instant::now();
        host.pause(&name).await.unwrap();
        let memory = std::fs::File::create(state.path().join("raw-memory")).unwrap();
        let mut qmp = Qmp::connect(&disk.with_file_name("qmp.sock"))
            .await
            .unwrap();
        qmp.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 1u64 << 40})),
        )
        .await
        .unwrap();
        qmp.send_fd("raw", std::os::fd::AsFd::as_fd(&memory))
            .await
            .unwrap();
        qmp.execute("migrate", Some(serde_json::json!({"uri": "fd:raw"})))
            .await
            .unwrap();
        while qmp.execute("query-migrate", None).await.unwrap()["status"] != "completed" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        memory.sync_all().unwrap();
        drop(qmp);
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-U", "-O", "qcow2"])
            .arg(&disk)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::File::open(&out).unwrap().sync_all().unwrap();
        host.resume(&name).await.unwrap();
        raw_ms.push(started.elapsed().as_millis() as u64);
        println!(
            "raw: stop, migrate, qemu-img convert, fsync, cont {n}: {} ms",
            raw_ms[n]
        );
        std::fs::remove_file(&out).unwrap();
        std::fs::remove_file(state.path().join("raw-memory")).unwrap();
        let started = std::time::Instant::now();
        let made = host.snapshot(&name, &format!("bench-{n}")).await.unwrap();
        snapshot_ms.push(started.elapsed().as_millis() as u64);
        assert!(made.memory_bytes > 0, "{made:?}");
        println!(
            "snapshot {n}: {} ms, {} MB kept, {} MB of it memory",
            snapshot_ms[n],
            made.size_bytes / 1_000_000,
            made.memory_bytes / 1_000_000
        );
    }
    assert_eq!(run(&pool, &source, "echo alive").await, "alive");
    let mut from_snapshot = Vec::new();
    let mut from_disk = Vec::new();
    let mut cold = Vec::new();
    for n in 0..3 {
        for (kind, snapshot, memory_mb) in [
            ("made", Some("bench-0".to_string()), 512),
            ("disk", Some("bench-0".to_string()), 640),
            ("cold", None, 512),
        ] {
            let keys = KeyPair::generate();
            let vm = format!("hearth-bench-{kind}-{n}-{pid}");
            let started = std::time::Instant::now();
            let spec = VmSpec {
                snapshot,
                memory_mb,
                ..spec(&vm, kind, &keys)
            };
            let record = host.create(&spec).await.unwrap();
            let target = target(&vm, record.ssh_port, &keys);
            pool.wait_ready(&target, Duration::from_secs(240))
                .await
                .unwrap();
            let ms = started.elapsed().as_millis() as u64;
            match kind {
                "cold" => cold.push(ms),
                _ => {
                    assert_eq!(run(&pool, &target, "stat -c %s ~/blob").await, "1000000000");
                    if kind == "made" {
                        from_snapshot.push(ms)
                    } else {
                        from_disk.push(ms)
                    }
                }
            }
            println!("{kind} {n}: first exec at {ms} ms");
            pool.forget(&vm).await;
            host.destroy(&vm).await.unwrap();
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let (s, r) = (median(&mut snapshot_ms), median(&mut raw_ms));
    let (m, d, c) = (
        median(&mut from_snapshot),
        median(&mut from_disk),
        median(&mut cold),
    );
    println!(
        "snapshot p50 {s} ms, raw convert p50 {r} ms, ratio {:.2}",
        s as f64 / r as f64
    );
    println!(
        "restored from the snapshot's memory to first exec p50 {m} ms, booted from its disk p50 {d} ms, cold boot p50 {c} ms; restored/cold {:.2}",
        m as f64 / c as f64
    );
}

/// A user's snapshot of a running VM keeps its memory (`qemu` on `microvm`), saved in the
/// same pause as its disk, with QEMU confined to its own user as the agent runs it (when
/// the test runs as root). A VM made from the snapshot with the same sizes is restored, not
/// booted: the file its source wrote to tmpfs (memory only) is there, the process it left
/// running still runs, and it has an identity of its own (hostname, MAC, machine id, host
/// key, random stream); the source's key does not log in. The source runs on after the
/// snapshot. A VM of another memory size made from the same snapshot boots from the disk.
#[tokio::test]
async fn a_snapshot_keeps_a_running_vms_memory() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let image = image();
    assert!(image.mmio, "memory snapshots need the microvm image");
    let state = tempfile::tempdir().unwrap();
    let _cleanup = KillVmsUnder(state.path().to_path_buf());
    // SAFETY: geteuid has no preconditions.
    let runas = (unsafe { libc::geteuid() } == 0)
        .then(|| hearth_agent::guard::confine().expect("confine QEMU as root"));
    let host = QemuHost::new(
        state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap()
    .run_as(runas);
    let pool = SshPool::new();
    let pid = std::process::id();

    let source_keys = KeyPair::generate();
    let source = format!("hearth-mem-source-{pid}");
    let record = host
        .create(&spec(&source, "vm-source", &source_keys))
        .await
        .unwrap();
    let source_target = target(&source, record.ssh_port, &source_keys);
    pool.wait_ready(&source_target, Duration::from_secs(120))
        .await
        .expect("SSH answers");
    run(
        &pool,
        &source_target,
        "echo in-memory > /dev/shm/note && echo on-disk > ~/note && sync \
         && (setsid sleep 31337 </dev/null >/dev/null 2>&1 &) && echo started",
    )
    .await;
    let source_identity = identity(&pool, &source_target).await;

    let snapshot = host.snapshot(&source, "with-memory").await.unwrap();
    assert!(
        snapshot.memory_bytes > 10 << 20 && snapshot.memory_bytes <= 512 << 20,
        "{snapshot:?}"
    );
    assert!(snapshot.size_bytes > snapshot.memory_bytes, "{snapshot:?}");
    // The source ran on.
    assert_eq!(host.status(&source).await.unwrap(), Some(VmStatus::Running));
    assert_eq!(
        run(&pool, &source_target, "cat /dev/shm/note").await,
        "in-memory"
    );
    // Nothing of the save is left beside the snapshots.
    let hidden: Vec<String> = std::fs::read_dir(state.path().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");

    // Restored, with the same sizes.
    let keys = KeyPair::generate();
    let restored = format!("hearth-mem-restored-{pid}");
    let record = host
        .create(&VmSpec {
            snapshot: Some("with-memory".into()),
            ..spec(&restored, "vm-restored", &keys)
        })
        .await
        .unwrap();
    assert_eq!(record.restored_from, None, "not a base snapshot's");
    assert!(
        command_lines(&restored)[0].iter().any(|a| a == "-incoming"),
        "restored, not booted"
    );
    let restored_target = target(&restored, record.ssh_port, &keys);
    pool.wait_ready(&restored_target, Duration::from_secs(60))
        .await
        .expect("the restored VM's SSH answers");
    assert_eq!(
        run(&pool, &restored_target, "cat /dev/shm/note ~/note").await,
        "in-memory\non-disk"
    );
    assert_eq!(
        run(&pool, &restored_target, "pgrep -c -f 'sleep 31337'").await,
        "1",
        "the source's process runs on"
    );
    let restored_identity = identity(&pool, &restored_target).await;
    assert_eq!(restored_identity[0], "vm-restored");
    assert_eq!(Some(&restored_identity[1]), record.mac.as_ref());
    for field in 1..5 {
        assert_ne!(
            restored_identity[field], source_identity[field],
            "field {field} equals the source's"
        );
    }
    let foreign = Target {
        private_key_openssh: source_keys.private_openssh.clone(),
        environment_id: format!("{restored}-foreign"),
        ..restored_target.clone()
    };
    assert!(pool.probe(&foreign, Duration::from_secs(10)).await.is_err());

    // Another memory size: booted from the snapshot's disk, its tmpfs empty.
    let booted = format!("hearth-mem-booted-{pid}");
    let record = host
        .create(&VmSpec {
            snapshot: Some("with-memory".into()),
            memory_mb: 640,
            ..spec(&booted, "vm-booted", &keys)
        })
        .await
        .unwrap();
    assert!(!command_lines(&booted)[0].iter().any(|a| a == "-incoming"));
    let booted_target = target(&booted, record.ssh_port, &keys);
    pool.wait_ready(&booted_target, Duration::from_secs(120))
        .await
        .expect("the booted VM's SSH answers");
    assert_eq!(
        run(
            &pool,
            &booted_target,
            "cat ~/note; test -e /dev/shm/note || echo no-tmpfs-note"
        )
        .await,
        "on-disk\nno-tmpfs-note"
    );

    // An agent killed while a snapshot saved the source's memory: QEMU holds the VM in
    // `postmigrate`, its disk let go, the marker and a work directory left. The next agent
    // removes the work directory and resumes the VM, which runs on.
    host.pause(&source).await.unwrap();
    let vm_dir = state.path().join("vms").join(&source);
    std::fs::write(vm_dir.join("paused-for-snapshot"), b"").unwrap();
    let work = state.path().join("snapshots/.killed.work");
    std::fs::create_dir_all(&work).unwrap();
    let memory = std::fs::File::create(work.join("memory")).unwrap();
    let mut qmp = Qmp::connect(&vm_dir.join("qmp.sock")).await.unwrap();
    qmp.send_fd("killed", std::os::fd::AsFd::as_fd(&memory))
        .await
        .unwrap();
    qmp.execute("migrate", Some(serde_json::json!({"uri": "fd:killed"})))
        .await
        .unwrap();
    while qmp.status().await.unwrap() != "postmigrate" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(qmp);
    assert_eq!(
        host.status(&source).await.unwrap(),
        Some(VmStatus::Running),
        "a snapshot's pause is not a state of the VM's"
    );
    let again = QemuHost::new(
        state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap();
    assert!(!work.exists());
    again.recover().await;
    assert!(!vm_dir.join("paused-for-snapshot").exists());
    assert_eq!(
        again.status(&source).await.unwrap(),
        Some(VmStatus::Running)
    );
    assert_eq!(
        run(
            &pool,
            &source_target,
            "echo written > ~/after && cat ~/after"
        )
        .await,
        "written"
    );

    // A guest that no longer listens on its identity port could not take its identity
    // once restored: its snapshot keeps the disk only.
    run(
        &pool,
        &source_target,
        "sudo -n pkill -f 'hearth-await-resto[r]e'; echo ended",
    )
    .await;
    let disk_only = again.snapshot(&source, "disk-only").await.unwrap();
    assert_eq!(disk_only.memory_bytes, 0, "{disk_only:?}");

    for name in [&source, &restored, &booted] {
        pool.forget(name).await;
        again.destroy(name).await.unwrap();
        assert_eq!(processes(name), 0);
    }
    assert!(again.remove_snapshot("disk-only").await.unwrap());
    assert!(
        again.remove_snapshot("with-memory").await.unwrap(),
        "no VM uses it any more"
    );
}
