//! Real servers for integration tests: a `redis-server` on a free loopback port, and a
//! three-master local Redis Cluster.
//!
//! Each server is started fresh with no persistence, and killed (its files removed) when the
//! handle is dropped. When `redis-server` is not installed, starting one panics with a
//! message naming the Debian package: these tests fail, never skip, without their server.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a server may take to start answering before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn redis_available() -> bool {
    for bin in ["redis-server", "redis-cli"] {
        let found = Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            panic!(
                "{bin} is not installed. Install Debian's package with \
                 `apt-get install redis-server` (scripts/test.sh does this)."
            );
        }
    }
    true
}

/// A loopback port that was free a moment ago (and, when `bus` is set, whose cluster-bus
/// port `port + 10000` was free too).
fn free_port(bus: bool) -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        if !bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "palisade-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Sends one inline command over RESP and returns the raw reply.
pub async fn command(addr: SocketAddr, cmd: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("{cmd}\r\n").as_bytes()).await?;
    let mut buf = vec![0u8; 8192];
    let n = stream.read(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Polls `check` until it is true or the start timeout passes (real time: the servers are
/// real processes).
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {START_TIMEOUT:?} waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn_redis(port: u16, dir: &Path, extra: &[&str]) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--protected-mode", "yes"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .expect("redis-server is installed but failed to start")
}

/// A test certificate authority and a server certificate it signed for 127.0.0.1 and
/// `localhost`, made with the `openssl` command line tool (EC P-256, valid two days).
pub struct TestCerts {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line tool is installed (Debian package `openssl`)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TestCerts {
    /// Makes a fresh CA and a server certificate in `dir`.
    pub fn generate(dir: &Path) -> Self {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca_subject = format!("/CN=palisade test CA {}", rand::random::<u32>());
        let mut ca = vec![
            "req", "-x509", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
        ];
        ca.extend(ec);
        ca.extend(["-subj", &ca_subject]);
        openssl(dir, &ca);
        let mut csr = vec!["req", "-keyout", "server.key", "-out", "server.csr"];
        csr.extend(ec);
        csr.extend(["-subj", "/CN=127.0.0.1"]);
        openssl(dir, &csr);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "server.crt",
                "-extfile",
                "server.ext",
            ],
        );
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_file()).unwrap()
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `redis-server` arguments serving TLS on `tls_port` with the server certificate
    /// (clients need no certificate of their own).
    fn server_args(&self, tls_port: u16) -> Vec<String> {
        let file = |name: &str| self.dir.join(name).to_str().unwrap().to_owned();
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            file("server.crt"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }
}

/// A CA that signed nothing the test servers present (PEM), for wrong-CA tests.
pub fn unrelated_ca_pem() -> Vec<u8> {
    let dir = temp_dir("other-ca");
    let certs = TestCerts::generate(&dir);
    let pem = certs.ca_pem();
    let _ = std::fs::remove_dir_all(&dir);
    pem
}

/// One real `redis-server`, killed on drop.
pub struct RedisServer {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    extra: Vec<String>,
    tls: Option<(SocketAddr, TestCerts)>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    pub async fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let dir = temp_dir("redis");
        let port = free_port(false);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let child = spawn_redis(port, &dir, &[]);
        let mut server = Self {
            child,
            dir,
            addr,
            extra: Vec::new(),
            tls: None,
        };
        let child = &mut server.child;
        wait_until("redis-server to answer PING", || {
            let exited = child.try_wait().ok().flatten();
            assert!(exited.is_none(), "redis-server exited early: {exited:?}");
            async move {
                command(addr, "PING")
                    .await
                    .is_ok_and(|r| r.starts_with("+PONG"))
            }
        })
        .await;
        Some(server)
    }

    /// Starts a server that serves TLS on a second port (with a fresh test CA) beside its
    /// plain port, and waits until it answers `PING` on the plain one.
    pub async fn start_tls() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let dir = temp_dir("redis-tls");
        let certs = TestCerts::generate(&dir);
        let port = free_port(false);
        let tls_port = loop {
            let p = free_port(false);
            if p != port {
                break p;
            }
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let extra = certs.server_args(tls_port);
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let child = spawn_redis(port, &dir, &args);
        let mut server = Self {
            child,
            dir,
            addr,
            extra,
            tls: Some((SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port)), certs)),
        };
        let child = &mut server.child;
        wait_until("redis-server (TLS) to answer PING", || {
            let exited = child.try_wait().ok().flatten();
            assert!(exited.is_none(), "redis-server exited early: {exited:?}");
            async move {
                command(addr, "PING")
                    .await
                    .is_ok_and(|r| r.starts_with("+PONG"))
            }
        })
        .await;
        Some(server)
    }

    /// A `rediss://` URL for a server from [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> String {
        let (addr, _) = self.tls.as_ref().expect("a server started with start_tls");
        format!("rediss://{addr}/")
    }

    /// The test CA of a server from [`RedisServer::start_tls`].
    pub fn certs(&self) -> &TestCerts {
        &self
            .tls
            .as_ref()
            .expect("a server started with start_tls")
            .1
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server (SIGKILL: no goodbye to its clients); [`RedisServer::restart`]
    /// starts it again on the same port, empty.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port and waits until it answers `PING`.
    pub async fn restart(&mut self) {
        self.kill();
        let args: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = spawn_redis(self.addr.port(), &self.dir, &args);
        let addr = self.addr;
        wait_until("the restarted redis-server to answer PING", || async move {
            command(addr, "PING")
                .await
                .is_ok_and(|r| r.starts_with("+PONG"))
        })
        .await;
    }

    /// A `redis://` URL for the server.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real three-master Redis Cluster on loopback, killed on drop.
pub struct RedisCluster {
    nodes: Vec<Child>,
    dir: PathBuf,
    addrs: Vec<SocketAddr>,
    tls: Option<(Vec<SocketAddr>, TestCerts)>,
}

impl RedisCluster {
    /// Starts three `redis-server --cluster-enabled yes` nodes, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports `cluster_state:ok`.
    pub async fn start() -> Option<Self> {
        Self::start_nodes(3, 0, false).await
    }

    /// Three masters that serve clients and each other over TLS (a fresh test CA) beside
    /// their plain ports.
    pub async fn start_tls() -> Option<Self> {
        Self::start_nodes(3, 0, true).await
    }

    /// Six nodes: three masters, each with one replica (for failover tests); waits until
    /// every replica's link to its master is up.
    pub async fn start_with_replicas() -> Option<Self> {
        Self::start_nodes(6, 1, false).await
    }

    async fn start_nodes(count: usize, replicas: usize, tls: bool) -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let dir = temp_dir("cluster");
        let certs = tls.then(|| TestCerts::generate(&dir));
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
            addrs: Vec::new(),
            tls: None,
        };
        let mut tls_addrs = Vec::new();
        for i in 0..count {
            let port = loop {
                let p = free_port(true);
                if !cluster.addrs.iter().any(|a| a.port() == p) {
                    break p;
                }
            };
            let node_dir = cluster.dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let conf = node_dir.join("nodes.conf");
            let conf = conf.to_str().unwrap();
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf,
                "--cluster-node-timeout",
                "5000",
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some(certs) = &certs {
                let tls_port = loop {
                    let p = free_port(false);
                    if p != port && !cluster.addrs.iter().any(|a| a.port() == p) {
                        break p;
                    }
                };
                tls_addrs.push(SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port)));
                args.extend(certs.server_args(tls_port));
                args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let child = spawn_redis(port, &node_dir, &args);
            cluster.nodes.push(child);
            cluster
                .addrs
                .push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
        for &addr in &cluster.addrs {
            wait_until("a cluster node to answer PING", || async move {
                command(addr, "PING")
                    .await
                    .is_ok_and(|r| r.starts_with("+PONG"))
            })
            .await;
        }
        let hosts: Vec<String> = cluster.addrs.iter().map(ToString::to_string).collect();
        let output = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&hosts)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for &addr in &cluster.addrs {
            wait_until("cluster_state:ok on every node", || async move {
                command(addr, "CLUSTER INFO")
                    .await
                    .is_ok_and(|r| r.contains("cluster_state:ok"))
            })
            .await;
        }
        if replicas > 0 {
            for &addr in &cluster.addrs {
                wait_until("every replica linked to its master", || async move {
                    command(addr, "INFO replication").await.is_ok_and(|r| {
                        r.contains("role:master") || r.contains("master_link_status:up")
                    })
                })
                .await;
            }
        }
        cluster.tls = certs.map(|c| (tls_addrs, c));
        Some(cluster)
    }

    /// `rediss://` URLs for every node of a cluster from [`RedisCluster::start_tls`].
    pub fn tls_urls(&self) -> Vec<String> {
        let (addrs, _) = self.tls.as_ref().expect("a cluster started with start_tls");
        addrs.iter().map(|a| format!("rediss://{a}/")).collect()
    }

    /// The test CA of a cluster from [`RedisCluster::start_tls`].
    pub fn certs(&self) -> &TestCerts {
        &self
            .tls
            .as_ref()
            .expect("a cluster started with start_tls")
            .1
    }

    /// The nodes' addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `redis://` URLs for every node (seed nodes for a cluster client).
    pub fn urls(&self) -> Vec<String> {
        self.addrs.iter().map(|a| format!("redis://{a}/")).collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn key_slot(&self, key: &str) -> u64 {
        command(self.addrs[0], &format!("CLUSTER KEYSLOT {key}"))
            .await
            .unwrap()
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap()
    }

    /// The replica whose master serves `slot`, on a cluster from
    /// [`RedisCluster::start_with_replicas`].
    pub async fn replica_of_slot(&self, slot: u64) -> SocketAddr {
        let mut replica = None;
        for &addr in &self.addrs {
            let nodes = command(addr, "CLUSTER NODES").await.unwrap();
            let myself = nodes.lines().find(|l| l.contains("myself")).unwrap();
            if myself.contains("slave") {
                let master_id = myself.split(' ').nth(3).unwrap();
                let master = nodes.lines().find(|l| l.starts_with(master_id)).unwrap();
                let serves = master.split(' ').skip(8).any(|range| {
                    let mut ends = range
                        .split('-')
                        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
                    let lo = ends.next().unwrap();
                    let hi = ends.next().unwrap_or(lo);
                    (lo..=hi).contains(&slot)
                });
                if serves {
                    replica = Some(addr);
                }
            }
        }
        replica.expect("a replica of the slot's master")
    }

    /// Promotes the replica of the master serving `slot` with `CLUSTER FAILOVER` and waits
    /// (10 s at most) until it reports itself master; returns the promoted node.
    pub async fn fail_over_slot(&self, slot: u64) -> SocketAddr {
        let replica = self.replica_of_slot(slot).await;
        let reply = command(replica, "CLUSTER FAILOVER").await.unwrap();
        assert!(reply.starts_with("+OK"), "{reply}");
        let start = std::time::Instant::now();
        while !command(replica, "INFO replication")
            .await
            .unwrap()
            .contains("role:master")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "failover did not happen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        replica
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
