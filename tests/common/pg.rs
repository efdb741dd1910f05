//! A real PostgreSQL server for the shared-mode tests.
//!
//! `BIOSEAL_TEST_PG_HOST` names the socket directory of a server already
//! running (user `postgres`, trust authentication), as `.ci/run` starts
//! one for the whole suite. Without it, the first test that needs a server
//! starts one for this test binary: `initdb` into a temporary directory and
//! `postgres` on a Unix socket there, as the `postgres` user when run as
//! root (the server refuses root), fsync on. A watchdog stops it and
//! removes the directory when the test binary exits.
//!
//! No server binaries (`/usr/lib/postgresql/*/bin`): the shared-mode tests
//! fail with a message saying so, unless `BIOSEAL_NO_POSTGRES=1` asks to
//! skip them (then each prints a notice).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The socket directory of the test server.
pub fn host() -> &'static Path {
    static HOST: OnceLock<PathBuf> = OnceLock::new();
    HOST.get_or_init(|| match std::env::var_os("BIOSEAL_TEST_PG_HOST") {
        Some(h) => PathBuf::from(h),
        None => start(),
    })
}

/// Whether shared-mode tests are to be skipped (`BIOSEAL_NO_POSTGRES=1`).
pub fn skipped(test: &str) -> bool {
    if std::env::var_os("BIOSEAL_NO_POSTGRES").is_some_and(|v| v == "1") {
        eprintln!("NOTICE: {test}: skipped on PostgreSQL (BIOSEAL_NO_POSTGRES=1)");
        return true;
    }
    false
}

/// The URL of database `db` on the test server.
pub fn url(db: &str) -> String {
    format!(
        "postgresql://postgres@localhost/{db}?host={}",
        host().display()
    )
}

/// A new, empty database on the test server; returns its URL.
pub fn fresh_database() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let mut c = admin();
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    url(&name)
}

/// A client on the server's `postgres` database.
pub fn admin() -> postgres::Client {
    postgres::Client::connect(&url("postgres"), postgres::NoTls).expect("connect to test server")
}

/// A client on the database of `url`.
pub fn client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connect")
}

fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    dirs.retain(|d| d.join("postgres").exists());
    dirs.sort();
    dirs.pop().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install the \
             postgresql package, or set BIOSEAL_NO_POSTGRES=1 to skip the shared-mode tests"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Run `cmd` (a shell command line) as the server's user.
fn as_server_user(cmd: &str) -> Command {
    let mut c;
    if is_root() {
        c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", cmd]);
    } else {
        c = Command::new("sh");
        c.args(["-c", cmd]);
    }
    c
}

/// Everything below `p` to the server's user (when run as root).
fn give_to_server_user(p: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
            .expect("chown");
        assert!(ok.success(), "chown {} to postgres", p.display());
    }
}

/// A new cluster: `initdb` into a kept temporary directory (`prefix`...)
/// with a socket directory beside it. Returns (binaries, directory, data
/// directory, socket directory).
fn new_cluster(prefix: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let bin = bin_dir();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
        .keep();
    let (data, sock) = (dir.join("data"), dir.join("s"));
    std::fs::create_dir(&sock).expect("socket dir");
    give_to_server_user(&dir);
    let init = as_server_user(&format!(
        "{}/initdb -D {} -A trust -U postgres --no-sync >/dev/null",
        bin.display(),
        data.display()
    ))
    .status()
    .expect("initdb");
    assert!(init.success(), "initdb failed");
    (bin, dir, data, sock)
}

/// Start a server for this test binary; returns its socket directory.
fn start() -> PathBuf {
    let (bin, dir, data, sock) = new_cluster("bioseal-pg");
    // The server runs until this test binary exits; then the watchdog
    // stops it (fast shutdown) and removes the directory.
    let server = format!(
        "{}/postgres -D {} -k {} -c listen_addresses= -c fsync=on -c max_connections=300 \
         -c shared_buffers=64MB",
        bin.display(),
        data.display(),
        sock.display()
    );
    let watchdog = format!(
        "exec {server} >{dir}/log 2>&1 & s=$!; while [ -d /proc/{pid} ]; do sleep 0.5; done; \
         kill -INT $s; while [ -d /proc/$s ]; do sleep 0.2; done; rm -rf {dir}",
        dir = dir.display(),
        pid = std::process::id()
    );
    let watchdog = if is_root() {
        format!(
            "runuser -u postgres -- sh -c '{}'",
            watchdog.replace('\'', "'\\''")
        )
    } else {
        watchdog
    };
    // Kept for the life of the test binary; the watchdog outlives it.
    static WATCHDOG: std::sync::Mutex<Option<std::process::Child>> = std::sync::Mutex::new(None);
    let child = Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start postgres");
    *WATCHDOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!(
        "postgresql://postgres@localhost/postgres?host={}",
        sock.display()
    );
    loop {
        match postgres::Client::connect(&url, postgres::NoTls) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                panic!("test PostgreSQL did not start: {e}\n{log}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    sock
}

/// A server of a test's own, for tests that stop and restart it or read
/// its files: `initdb` into a temporary directory, `pg_ctl` to start and
/// stop it (as the `postgres` user when run as root). Stopped and removed
/// on drop.
pub struct Server {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Server {
    pub fn start() -> Server {
        let (bin, dir, data, sock) = new_cluster("bioseal-pg-own");
        let s = Server {
            dir,
            data,
            sock,
            bin,
            port: 5432,
        };
        s.start_again();
        s
    }

    /// Start the (stopped) server and wait until it accepts connections.
    pub fn start_again(&self) {
        self.start_with("-c listen_addresses=");
    }

    fn start_with(&self, options: &str) {
        let ok = as_server_user(&format!(
            "{}/pg_ctl -D {} -l {}/log -w -o \"-k {} -c fsync=on {options}\" start >/dev/null",
            self.bin.display(),
            self.data.display(),
            self.dir.display(),
            self.sock.display()
        ))
        .status()
        .expect("pg_ctl start");
        assert!(ok.success(), "pg_ctl start failed");
    }

    /// A server that takes TCP connections on 127.0.0.1:`port` over TLS
    /// only (`hostssl`; the Unix socket stays open for the test's own
    /// admin client), with a certificate for `localhost` issued by a test
    /// CA. Returns the server, the port and the CA certificate's path.
    pub fn start_tls() -> (Server, u16, PathBuf) {
        let mut s = Server::start();
        s.stop("fast");
        let d = s.dir.display().to_string();
        let openssl = |args: &str| {
            let ok = Command::new("sh")
                .args(["-c", &format!("cd {d} && openssl {args} 2>/dev/null")])
                .status()
                .expect("openssl");
            assert!(ok.success(), "openssl {args}");
        };
        openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=bioseal-test-ca");
        openssl(
            "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
        );
        std::fs::write(
            s.dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        openssl("x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf");
        std::fs::write(
            s.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("hba");
        give_to_server_user(&s.dir);
        std::fs::set_permissions(
            s.dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        s.port = port;
        s.start_with(&format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
        ));
        let ca = s.dir.join("ca.crt");
        (s, port, ca)
    }

    /// Stop the server: `mode` is `fast` or `immediate` (no checkpoint:
    /// recovery from the WAL at the next start).
    pub fn stop(&self, mode: &str) {
        let _ = as_server_user(&format!(
            "{}/pg_ctl -D {} -m {mode} -w stop >/dev/null 2>&1",
            self.bin.display(),
            self.data.display()
        ))
        .status();
    }

    /// URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        let sock: String = self
            .sock
            .display()
            .to_string()
            .replace('%', "%25")
            .replace('/', "%2F");
        format!("postgresql://postgres@{sock}:{}/{db}", self.port)
    }

    /// A new database on this server; its URL.
    pub fn fresh_database(&self, name: &str) -> String {
        let mut c =
            postgres::Client::connect(&self.url("postgres"), postgres::NoTls).expect("connect");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        self.url(name)
    }

    /// Run a server binary (`pg_dump`, ...) with arguments; its stdout.
    pub fn tool(&self, name: &str, args: &str) -> Vec<u8> {
        let out = as_server_user(&format!("{}/{name} {args}", self.bin.display()))
            .output()
            .expect("run tool");
        assert!(
            out.status.success(),
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop("fast");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
