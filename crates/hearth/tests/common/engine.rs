//! A second Docker engine on this machine, really separate from the shared one: its own
//! socket, data root, exec root, bridge and (optionally) a TLS listener. With
//! `--live-restore`, its containers keep running while it is stopped, as a real host's do
//! while its daemon restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Engine {
    pub dir: PathBuf,
    pub socket: String,
    bridge: String,
    subnet: u8,
    child: Option<Child>,
    /// `tcp://127.0.0.1:PORT` and the client's PEM material, when started with TLS.
    pub tls: Option<Tls>,
}

pub struct Tls {
    pub endpoint: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn certificates(dir: &Path) {
    let ossl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=hearth-test-ca",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (who, cn, ext) in [
        ("server", "/CN=127.0.0.1", "server.ext"),
        ("client", "/CN=hearth-node", "client.ext"),
    ] {
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{who}-key.pem"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            cn,
        ]);
        ossl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{who}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            ext,
        ]);
    }
}

impl Engine {
    /// `subnet` (1 to 250) picks the bridge 172.30.<subnet>.0/24: give each test its own.
    pub fn start(subnet: u8, with_tls: bool) -> Engine {
        // Short: containerd's socket lives under the exec root and paths have a length limit.
        let dir = PathBuf::from(format!("/tmp/hd{subnet}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bridge = format!("hbr{subnet}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("172.30.{subnet}.1/24"),
            "dev",
            &bridge,
        ]));
        run(Command::new("ip").args(["link", "set", &bridge, "up"]));
        let tls = with_tls.then(|| {
            certificates(&dir);
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
            Tls {
                endpoint: format!("tcp://127.0.0.1:{}", super::free_port()),
                ca: read("ca.pem"),
                cert: read("client-cert.pem"),
                key: read("client-key.pem"),
            }
        });
        let socket = format!("unix://{}/docker.sock", dir.display());
        let mut engine = Engine {
            dir,
            socket,
            bridge,
            subnet,
            child: None,
            tls,
        };
        engine.launch();
        engine
    }

    fn launch(&mut self) {
        let d = &self.dir;
        let mut cmd = Command::new("dockerd");
        cmd.args(["--host", &self.socket])
            .arg(format!("--data-root={}", d.join("data").display()))
            .arg(format!("--exec-root={}", d.join("exec").display()))
            .arg(format!("--pidfile={}", d.join("docker.pid").display()))
            .arg(format!("--bridge={}", self.bridge))
            .args(["--iptables=false", "--live-restore"]);
        if let Some(tls) = &self.tls {
            cmd.args(["--host", &tls.endpoint, "--tlsverify"])
                .arg(format!("--tlscacert={}", d.join("ca.pem").display()))
                .arg(format!("--tlscert={}", d.join("server-cert.pem").display()))
                .arg(format!("--tlskey={}", d.join("server-key.pem").display()));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        self.child = Some(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("dockerd"),
        );
        let started = Instant::now();
        while !self.docker(&["info"]).status.success() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the second dockerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The host `options` for this engine: VM networks from a range of its own, since two
    /// engines on one machine do not see each other's networks.
    pub fn options(&self) -> serde_json::Value {
        serde_json::json!({ "subnetPool": format!("10.214.{}.0/24", self.subnet) })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(["-H", &self.socket])
            .args(args)
            .output()
            .unwrap()
    }

    /// Copies the guest image from the shared engine.
    pub fn load_image(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let load = Command::new("docker")
            .args(["-H", &self.socket, "load"])
            .stdin(save.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(
            save.wait().unwrap().success() && load.status.success(),
            "loading {image}: {}",
            String::from_utf8_lossy(&load.stderr)
        );
    }

    /// Containers (running or not) of an environment on this engine.
    pub fn containers_of(&self, environment_id: &str) -> Vec<String> {
        let out = self.docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=hearth.environment={environment_id}"),
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn running(&self, environment_id: &str) -> bool {
        let out = self.docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=hearth.environment={environment_id}"),
        ]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }

    /// Stops the daemon (SIGTERM); its containers keep running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).output();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.launch();
        }
        let out = self.docker(&["ps", "-aq"]);
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = self.docker(&args);
        }
        // Its VMs' networks go with the engine's data root, but their bridges would stay in
        // the kernel with routes to nowhere.
        let _ = self.docker(&["network", "prune", "-f"]);
        self.stop();
        let exec_root = self.dir.join("exec").display().to_string();
        let _ = Command::new("pkill").args(["-f", &exec_root]).output();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("data"))
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = self.subnet;
    }
}
