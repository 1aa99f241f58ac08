//! The `qemu` backend with real QEMU (software emulation) and the VM image that
//! `hearth image build --vm` made (`make test` builds it): a VM boots its own kernel, has
//! the disk it asked for, pauses, stops, starts, is adopted by a new agent, is reported when
//! it dies, and leaves nothing behind.

use hearth_agent::image::VmImage;
use hearth_agent::qemu::QemuHost;
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

/// QEMU processes running VM `name`.
fn processes(name: &str) -> usize {
    command_lines(name).len()
}

#[tokio::test]
async fn a_vm_boots_its_own_kernel_and_lives_its_whole_life() {
    let image = image();
    let state = tempfile::tempdir().unwrap();
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

    // A new agent on the same state adopts the running VM instead of starting another.
    let again = QemuHost::new(
        state.path().to_path_buf(),
        image.clone(),
        Accel::Tcg,
        "127.0.0.1",
    )
    .unwrap();
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
