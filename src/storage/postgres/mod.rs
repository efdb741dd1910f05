//! The shared backend: PostgreSQL, for many service replicas on one
//! database (feature `postgres`).
//!
//! Schema `bioseal` (version [`SCHEMA_VERSION`], in `bioseal.schema`):
//! one table per [`Table`] (`k bytea primary key, v bytea`), and
//! `bioseal.keyring (part int primary key, v bytea)`: the keyring image of
//! `crate::crypto::keyring` cut into 128-byte units (header, the two state
//! copies, every KEK slot), each sealed or MACed under keys derived from
//! the root key, as in the keyring file. Nothing here is readable without
//! the root key.
//!
//! Every write is one statement (one round trip, atomic); PostgreSQL makes
//! a commit durable before it returns (`synchronous_commit` on, the
//! default), so [`Backend::flush`] has nothing left to do. Bucket locks are
//! session advisory locks (`pg_advisory_lock(namespace, bucket)`, the
//! namespace taken from the store id), taken for a set of buckets in one
//! round trip and in ascending order; while a thread holds them, its
//! queries go over the same connection. A replica killed with its locks
//! held loses its session, and PostgreSQL releases them.
//!
//! Queries use `query_typed` (parameters typed by the client): one round
//! trip each, no prepare step.

mod keyring;
mod tls;

use keyring::units;
pub(crate) use keyring::PgMedium;

use super::{Backend, RemoteLock, Row, Table, Value, Visit, Writes};
use crate::error::{Error, Result};
use postgres::types::{ToSql, Type};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The schema version this code creates and reads.
pub const SCHEMA_VERSION: i32 = 1;
/// Rows a scan fetches per round trip.
const PAGE: i64 = 1024;
/// Advisory-lock namespace of store creation (before any store id exists).
const INIT_NAMESPACE: i32 = 0x6269_6f73; // "bios"
/// Lock "bucket" of the keyring state and the audit tail (buckets are
/// 0..65536).
pub(crate) const STATE_LOCK: i32 = -1;
/// The epoch gate: every holder of bucket locks holds it shared; an epoch
/// roll takes it exclusively, so that no keyring write of any replica
/// interleaves with the re-sealing.
const EPOCH_GATE: i32 = -2;
/// `EPOCH_GATE` taken shared, in a lock list (never a bucket index).
const GATE_SHARED: i32 = i32::MIN;

/// A pooled connection. `broken` is set when a statement failed in a way
/// that may leave session state (advisory locks) behind: the pool then
/// closes the connection instead of reusing it.
pub(crate) struct Conn {
    client: postgres::Client,
    broken: bool,
}

struct Manager {
    config: postgres::Config,
    tls: tls::Tls,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<Conn, postgres::Error> {
        Ok(Conn {
            client: self.tls.connect(&self.config)?,
            broken: false,
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

type Pooled = r2d2::PooledConnection<Manager>;

/// A thread's connection while it holds advisory locks of a backend.
struct Held {
    backend: usize,
    conn: Pooled,
    /// Lock guards of this backend alive on this thread.
    depth: usize,
    /// A transaction is open on `conn` (begun by the first statement after
    /// a lock or a commit; committed by `flush` or when the last lock goes).
    in_txn: bool,
    /// The store said the writes since the last flush need not wait for
    /// the disk (`Backend::relax`).
    relaxed: bool,
    /// The transaction wrote keyring rows: always committed synchronously.
    strict: bool,
    /// Session locks released while others were held: unlocked after the
    /// commit, so that no replica takes them before the writes are visible.
    deferred: Vec<(i32, Vec<i32>)>,
    /// Keyring rows read with the locks (see `Backend::lock_buckets`).
    prefetch: std::collections::HashMap<i32, Vec<u8>>,
    /// Writes applied under the locks and not yet sent: they go with the
    /// next statement, or in the commit's round trip.
    pending: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
}

impl Held {
    /// Open the transaction if none is, and send the pending writes (a
    /// statement that follows them must see them).
    fn begin(&mut self) -> std::result::Result<(), postgres::Error> {
        let mut sql = String::new();
        if !self.in_txn {
            sql.push_str("BEGIN;");
        }
        sql.push_str(&apply_literal(std::mem::take(&mut self.pending)));
        if !sql.is_empty() {
            self.conn.client.simple_query(&sql)?;
        }
        if !self.in_txn {
            self.in_txn = true;
            self.relaxed = false;
            self.strict = false;
        }
        Ok(())
    }

    /// Commit the open transaction: synchronously (durable when this
    /// returns) unless relaxed, or `force` asks for it.
    /// The statements that send the pending writes and commit (empty:
    /// nothing to do); the transaction counts as closed from here.
    fn commit_sql(&mut self, force: bool) -> String {
        let writes = apply_literal(std::mem::take(&mut self.pending));
        if !self.in_txn && writes.is_empty() {
            return String::new();
        }
        let mut sql = String::new();
        if !self.in_txn {
            sql.push_str("BEGIN;");
        }
        sql.push_str(&writes);
        self.in_txn = false;
        let relaxed = self.relaxed && !self.strict && !force;
        if relaxed {
            UNSYNCED.with(|u| u.borrow_mut().push(self.backend));
            // Durable within PostgreSQL's WAL writer delay, in commit
            // order: what group commit is in embedded mode.
            sql.push_str("SET LOCAL synchronous_commit TO OFF;");
        }
        sql.push_str("COMMIT;");
        sql
    }

    fn commit(&mut self, force: bool) -> std::result::Result<(), postgres::Error> {
        let sql = self.commit_sql(force);
        if sql.is_empty() {
            return Ok(());
        }
        let relaxed = self.relaxed && !self.strict && !force;
        let r = self.conn.client.simple_query(&sql).map(|_| ());
        match &r {
            Err(_) => self.conn.broken = true,
            // A synchronous commit made this thread's earlier asynchronous
            // ones durable too.
            Ok(()) if !relaxed => UNSYNCED.with(|u| u.borrow_mut().retain(|&b| b != self.backend)),
            Ok(()) => {}
        }
        r
    }
}

thread_local! {
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
    /// Backends this thread committed to without waiting for the disk
    /// since its last durability point.
    static UNSYNCED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// The PostgreSQL backend.
pub(crate) struct PgBackend {
    id: usize,
    pool: r2d2::Pool<Manager>,
    /// `user@host:port/dbname`: no password, ever.
    name: String,
    /// Advisory-lock namespace (from the store id; set once the keyring is
    /// open).
    namespace: std::sync::atomic::AtomicI32,
    /// Per table: get, scan page, last, last at.
    sql: [TableSql; 4],
}

struct TableSql {
    get: String,
    page: String,
    last: String,
    last_at: String,
}

impl TableSql {
    fn new(t: Table) -> TableSql {
        let n = format!("bioseal.{}", t.name());
        TableSql {
            get: format!("SELECT v FROM {n} WHERE k = $1"),
            page: format!(
                "SELECT k, v FROM {n} WHERE k >= $1 AND ($2::bytea IS NULL OR k < $2) \
                 AND ($3::bytea IS NULL OR k > $3) ORDER BY k LIMIT $4"
            ),
            last: format!("SELECT k, v FROM {n} ORDER BY k DESC LIMIT 1"),
            last_at: format!("SELECT k, v FROM {n} WHERE k <= $1 ORDER BY k DESC LIMIT 1"),
        }
    }
}

/// `user@host:port/dbname` of a connection string, without its password.
pub(crate) fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

impl PgBackend {
    /// Connect to the database at `url` with up to `pool_size` connections,
    /// and create the schema if it is missing. Errors name the host and
    /// port, never the password.
    pub(crate) fn connect(url: &str, pool_size: u32) -> Result<Arc<PgBackend>> {
        let (url, tls) = tls::prepare(url)?;
        let config: postgres::Config = url.parse().map_err(|e: postgres::Error| {
            // The message of a parse error quotes no part of the URL.
            Error::Config(format!("not a PostgreSQL URL: {e}"))
        })?;
        let name = describe(&config);
        let mut config = config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // One direct attempt first: an unreachable server is reported at
        // once, not after the pool's retries.
        tls.connect(&config)
            .map_err(|e| Error::Storage(format!("{name}: {}", pg_message(&e))))?;
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(2))
            .min_idle(Some(0))
            .test_on_check_out(false)
            .connection_timeout(Duration::from_secs(3))
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager { config, tls });
        let sql = Table::ALL.map(TableSql::new);
        let pg = Arc::new(PgBackend {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pool,
            name,
            namespace: std::sync::atomic::AtomicI32::new(INIT_NAMESPACE),
            sql,
        });
        pg.create_schema()?;
        Ok(pg)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Storage(format!("{}: {e}", self.name))
    }

    /// Run `f` on this thread's locked connection, or on one from the pool.
    /// A failed statement marks the connection broken (closed by the pool).
    fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<R, postgres::Error>,
    ) -> Result<R> {
        let mut f = Some(f);
        let held = HELD.with(|h| {
            let mut h = h.borrow_mut();
            let x = h.iter_mut().find(|x| x.backend == self.id)?;
            let f = f.take()?;
            let r = x.begin().and_then(|()| f(&mut x.conn.client));
            if r.is_err() {
                x.conn.broken = true;
            }
            Some(r)
        });
        let r = match (held, f) {
            (Some(r), _) => r,
            (None, Some(f)) => {
                let mut conn = self.pool.get().map_err(|e| self.err(e))?;
                let r = f(&mut conn.client);
                if r.is_err() {
                    conn.broken = true;
                }
                r
            }
            (None, None) => return Err(self.err("no connection")),
        };
        r.map_err(|e| self.err(pg_message(&e)))
    }

    fn create_schema(&self) -> Result<()> {
        let found = self.with_conn(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&INIT_NAMESPACE])?;
            tx.batch_execute(
                "CREATE SCHEMA IF NOT EXISTS bioseal;
                 CREATE TABLE IF NOT EXISTS bioseal.schema (version int NOT NULL);",
            )?;
            let found: Option<i32> = tx
                .query_opt("SELECT max(version) FROM bioseal.schema", &[])?
                .and_then(|r| r.try_get(0).ok().flatten());
            if found.is_none() {
                let mut ddl = String::new();
                for t in Table::ALL {
                    ddl.push_str(&format!(
                        "CREATE TABLE bioseal.{} (k bytea PRIMARY KEY, v bytea NOT NULL);",
                        t.name()
                    ));
                }
                ddl.push_str(
                    "CREATE TABLE bioseal.keyring (part int PRIMARY KEY, v bytea NOT NULL);",
                );
                tx.batch_execute(&ddl)?;
                tx.execute("INSERT INTO bioseal.schema VALUES ($1)", &[&SCHEMA_VERSION])?;
            }
            tx.commit()?;
            Ok(found)
        })?;
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(Error::SchemaVersion {
                found: v,
                supported: SCHEMA_VERSION,
            }),
            _ => Ok(()),
        }
    }

    /// Set the advisory-lock namespace from the store id.
    pub(crate) fn set_namespace(&self, store_id: &[u8; 16]) {
        let ns = i32::from_be_bytes([store_id[0], store_id[1], store_id[2], store_id[3]]);
        // Never the creation lock's namespace.
        let ns = if ns == INIT_NAMESPACE { ns ^ 1 } else { ns };
        self.namespace.store(ns, Ordering::Relaxed);
    }

    /// The store-wide lock of the keyring state and the audit tail, held
    /// until the transaction commits (a transaction lock: released only
    /// once what was read and written under it is visible to others).
    pub(crate) fn lock_store(&self) -> Result<RemoteLock> {
        self.lock_in(
            self.namespace.load(Ordering::Relaxed),
            &[STATE_LOCK],
            true,
            &[],
        )
    }

    /// Exclude every other replica's keyring writes (an epoch roll): the
    /// epoch gate exclusively (every bucket-lock holder has left), then the
    /// state lock.
    fn lock_epoch_all(&self) -> Result<RemoteLock> {
        // Opens (which settle stray epochs) wait too.
        let init = self.lock_init()?;
        let ns = self.namespace.load(Ordering::Relaxed);
        let gate = self.lock_in(ns, &[EPOCH_GATE], false, &[])?;
        let state = self.lock_store()?;
        Ok(Box::new((state, gate, init)))
    }

    /// Serialise store creation across replicas.
    pub(crate) fn lock_init(&self) -> Result<RemoteLock> {
        self.lock_in(INIT_NAMESPACE, &[1], false, &[])
    }

    fn lock_in(&self, ns: i32, keys: &[i32], xact: bool, prefetch: &[i32]) -> Result<RemoteLock> {
        let has = HELD.with(|h| h.borrow().iter().any(|x| x.backend == self.id));
        if !has {
            let conn = self.pool.get().map_err(|e| self.err(e))?;
            HELD.with(|h| {
                h.borrow_mut().push(Held {
                    backend: self.id,
                    conn,
                    depth: 0,
                    in_txn: false,
                    relaxed: false,
                    strict: false,
                    deferred: Vec::new(),
                    prefetch: std::collections::HashMap::new(),
                    pending: Vec::new(),
                })
            });
        }
        HELD.with(|h| {
            if let Some(x) = h.borrow_mut().iter_mut().find(|x| x.backend == self.id) {
                x.depth += 1;
            }
        });
        // From here the guard releases what was taken, even on error.
        let guard = PgLock {
            backend: self.id,
            ns,
            keys: keys.to_vec(),
            xact,
        };
        // One round trip: BEGIN if no transaction is open, the locks in the
        // order given, and the keyring rows to prefetch.
        let f = if xact {
            "pg_advisory_xact_lock"
        } else {
            "pg_advisory_lock"
        };
        let mut sql = String::new();
        for k in keys {
            if *k == GATE_SHARED {
                sql.push_str(&format!("SELECT {f}_shared({ns}, {EPOCH_GATE});"));
            } else {
                sql.push_str(&format!("SELECT {f}({ns}, {k});"));
            }
        }
        if !prefetch.is_empty() {
            let parts: Vec<String> = prefetch.iter().map(i32::to_string).collect();
            sql.push_str(&format!(
                "SELECT part, v FROM bioseal.keyring WHERE part IN ({});",
                parts.join(",")
            ));
        }
        let got = HELD.with(|h| {
            let mut h = h.borrow_mut();
            let x = h
                .iter_mut()
                .find(|x| x.backend == self.id)
                .ok_or_else(|| self.err("no connection"))?;
            let begin = !x.in_txn;
            let full = if begin { format!("BEGIN;{sql}") } else { sql };
            match x.conn.client.simple_query(&full) {
                Ok(msgs) => {
                    if begin {
                        x.in_txn = true;
                        x.relaxed = false;
                        x.strict = false;
                    }
                    for m in msgs {
                        // The lock rows have one column, the keyring rows two.
                        if let postgres::SimpleQueryMessage::Row(r) = m {
                            if let (Ok(Some(p)), Ok(Some(v))) = (r.try_get(0), r.try_get(1)) {
                                let part =
                                    p.parse::<i32>().map_err(|_| self.err("keyring part"))?;
                                let bytes = unhex(v).ok_or_else(|| self.err("keyring bytes"))?;
                                x.prefetch.insert(part, bytes);
                            }
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    x.conn.broken = true;
                    Err(self.err(pg_message(&e)))
                }
            }
        });
        got?;
        Ok(Box::new(guard))
    }

    /// Prefetched keyring rows `parts`, if every one of them was fetched
    /// under this thread's current locks (taken out: read once).
    fn take_prefetched(&self, parts: &[i32]) -> Option<Vec<(i32, Vec<u8>)>> {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            let x = h.iter_mut().find(|x| x.backend == self.id)?;
            if !parts.iter().all(|p| x.prefetch.contains_key(p)) {
                return None;
            }
            parts
                .iter()
                .map(|p| x.prefetch.remove(p).map(|v| (*p, v)))
                .collect()
        })
    }
}

/// `\x`-prefixed hex (PostgreSQL's text form of bytea).
fn unhex(s: &str) -> Option<Vec<u8>> {
    let h = s.strip_prefix("\\x")?.as_bytes();
    if h.len() % 2 != 0 {
        return None;
    }
    h.chunks(2)
        .map(|c| {
            let d = |x: u8| (x as char).to_digit(16);
            Some((d(c[0])? * 16 + d(c[1])?) as u8)
        })
        .collect()
}

/// Release advisory locks `keys` of backend `id` taken on this thread.
/// The last one commits the open transaction first (synchronously unless
/// relaxed; an error leaves the connection broken: closed, never reused),
/// then releases the session locks, so that the next holder sees every
/// write made under them.
fn unlock(id: usize, ns: i32, keys: &[i32], xact: bool) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        let Some(i) = h.iter().position(|x| x.backend == id) else {
            return;
        };
        let x = &mut h[i];
        if !xact {
            x.deferred.push((ns, keys.to_vec()));
        }
        x.depth = x.depth.saturating_sub(1);
        if x.depth > 0 {
            return;
        }
        // One round trip: the pending writes, the commit, then the session
        // unlocks.
        let relaxed = x.relaxed && !x.strict;
        let mut sql = x.commit_sql(false);
        let commits = !sql.is_empty();
        for (ns, keys) in std::mem::take(&mut x.deferred) {
            for k in keys {
                if k == GATE_SHARED {
                    sql.push_str(&format!(
                        "SELECT pg_advisory_unlock_shared({ns}, {EPOCH_GATE});"
                    ));
                } else {
                    sql.push_str(&format!("SELECT pg_advisory_unlock({ns}, {k});"));
                }
            }
        }
        if !sql.is_empty() {
            match x.conn.client.simple_query(&sql) {
                // Locks or a transaction may be left on the session: never
                // reuse it (the pool closes it; the server then releases
                // everything it held).
                Err(_) => x.conn.broken = true,
                Ok(_) if commits && !relaxed => {
                    UNSYNCED.with(|u| u.borrow_mut().retain(|&b| b != x.backend));
                }
                Ok(_) => {}
            }
        }
        h.swap_remove(i);
    });
}

impl PgBackend {
    /// Read keyring units `parts` (missing ones are absent from the result).
    pub(crate) fn keyring_parts(&self, parts: &[i32]) -> Result<Vec<(i32, Vec<u8>)>> {
        let parts = parts.to_vec();
        self.with_conn(|c| {
            c.query_typed(
                "SELECT part, v FROM bioseal.keyring WHERE part = ANY($1) ORDER BY part",
                &[(&parts, Type::INT4_ARRAY)],
            )
        })
        .and_then(|rows| {
            rows.iter()
                .map(|r| Ok((cell(r, 0)?, cell(r, 1)?)))
                .collect()
        })
    }

    /// Every keyring unit, in order.
    pub(crate) fn keyring_all(&self) -> Result<Vec<(i32, Vec<u8>)>> {
        self.with_conn(|c| c.query_typed("SELECT part, v FROM bioseal.keyring ORDER BY part", &[]))
            .and_then(|rows| {
                rows.iter()
                    .map(|r| Ok((cell(r, 0)?, cell(r, 1)?)))
                    .collect()
            })
    }

    /// Write keyring units in one statement (insert or overwrite).
    pub(crate) fn keyring_write(&self, units: &[(i32, Vec<u8>)]) -> Result<()> {
        self.keyring_upsert(units, None)
    }

    /// Replace the whole keyring image in one statement: units written,
    /// rows past its end deleted (disjoint rows; atomic).
    pub(crate) fn keyring_replace(&self, units: &[(i32, Vec<u8>)]) -> Result<()> {
        let end = i32::try_from(units.len()).map_err(|_| Error::tampered("keyring length"))?;
        self.keyring_upsert(units, Some(end))
    }

    /// Insert or overwrite `units` (and with `delete_from`, delete the rows
    /// from that part on) in one statement. A keyring write makes the
    /// held transaction's commit synchronous.
    fn keyring_upsert(&self, units: &[(i32, Vec<u8>)], delete_from: Option<i32>) -> Result<()> {
        HELD.with(|h| {
            if let Some(x) = h.borrow_mut().iter_mut().find(|x| x.backend == self.id) {
                x.strict = true;
            }
        });
        let parts: Vec<i32> = units.iter().map(|u| u.0).collect();
        let vals: Vec<&[u8]> = units.iter().map(|u| u.1.as_slice()).collect();
        let upsert =
            "INSERT INTO bioseal.keyring (part, v) SELECT * FROM unnest($1::int4[], $2::bytea[]) \
                      ON CONFLICT (part) DO UPDATE SET v = EXCLUDED.v";
        self.with_conn(|c| match &delete_from {
            None => c.query_typed(
                upsert,
                &[(&parts, Type::INT4_ARRAY), (&vals, Type::BYTEA_ARRAY)],
            ),
            Some(end) => c.query_typed(
                &format!("WITH gone AS (DELETE FROM bioseal.keyring WHERE part >= $3) {upsert}"),
                &[
                    (&parts, Type::INT4_ARRAY),
                    (&vals, Type::BYTEA_ARRAY),
                    (end, Type::INT4),
                ],
            ),
        })
        .map(|_| ())
    }
}

/// The apply statement with its values as literals (`decode('..','hex')`:
/// no quoting, whatever the server's string settings), for a simple query
/// that carries other statements in the same round trip. Later writes to a
/// key win. Empty for no writes.
fn apply_literal(writes: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>) -> String {
    if writes.is_empty() {
        return String::new();
    }
    let mut last: std::collections::HashMap<(Table, Vec<u8>), Option<Vec<u8>>> =
        std::collections::HashMap::new();
    for (t, k, v) in writes {
        last.insert((t, k), v);
    }
    let hex = |b: &[u8]| {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(b.len() * 2 + 24);
        s.push_str("decode('");
        for &x in b {
            s.push(char::from(DIGITS[usize::from(x >> 4)]));
            s.push(char::from(DIGITS[usize::from(x & 15)]));
        }
        s.push_str("','hex')");
        s
    };
    let array = |items: &[String]| {
        if items.is_empty() {
            "'{}'::bytea[]".to_owned()
        } else {
            format!("ARRAY[{}]::bytea[]", items.join(","))
        }
    };
    let mut sql = String::new();
    for t in Table::ALL {
        let (mut dels, mut keys, mut vals) = (Vec::new(), Vec::new(), Vec::new());
        for ((tt, k), v) in &last {
            if *tt != t {
                continue;
            }
            match v {
                None => dels.push(hex(k)),
                Some(v) => {
                    keys.push(hex(k));
                    vals.push(hex(v));
                }
            }
        }
        let n = format!("bioseal.{}", t.name());
        if !dels.is_empty() {
            sql.push_str(&format!("DELETE FROM {n} WHERE k = ANY({});", array(&dels)));
        }
        if !keys.is_empty() {
            sql.push_str(&format!(
                "INSERT INTO {n} (k, v) SELECT * FROM unnest({}, {}) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v;",
                array(&keys),
                array(&vals)
            ));
        }
    }
    sql
}

/// Column `i` of a row, typed: a row of another shape (a schema altered
/// behind bioseal's back, a NULL) is `Tampered`, never a panic.
fn cell<'a, T: postgres::types::FromSql<'a>>(r: &'a postgres::Row, i: usize) -> Result<T> {
    r.try_get(i)
        .map_err(|_| Error::tampered("database row (unexpected shape)"))
}

/// A PostgreSQL error's message: the server's own text (no connection
/// string is ever part of it).
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// Held advisory locks; released (on the thread that took them) on drop.
struct PgLock {
    backend: usize,
    ns: i32,
    keys: Vec<i32>,
    /// A transaction lock (released by the commit).
    xact: bool,
}

impl Drop for PgLock {
    fn drop(&mut self) {
        unlock(self.backend, self.ns, &self.keys, self.xact);
    }
}

impl Backend for PgBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Value>> {
        let sql = &self.sql[table as usize].get;
        self.with_conn(|c| c.query_typed(sql, &[(&key, Type::BYTEA)]))
            .and_then(|rows| {
                rows.first()
                    .map(|r| cell(r, 0).map(Value::Owned))
                    .transpose()
            })
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Value>>> {
        let sql = keys
            .iter()
            .enumerate()
            .map(|(i, (t, _))| {
                format!(
                    "SELECT {i}::int4, v FROM bioseal.{} WHERE k = ${}",
                    t.name(),
                    i + 1
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let params: Vec<(&(dyn ToSql + Sync), Type)> = keys
            .iter()
            .map(|(_, k)| (k as &(dyn ToSql + Sync), Type::BYTEA))
            .collect();
        let rows = self.with_conn(|c| c.query_typed(&sql, &params))?;
        let mut out: Vec<Option<Value>> = keys.iter().map(|_| None).collect();
        for r in rows {
            let i: i32 = cell(&r, 0)?;
            let slot = usize::try_from(i)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| self.err("unexpected row"))?;
            *slot = Some(Value::Owned(cell(&r, 1)?));
        }
        Ok(out)
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> Result<()> {
        let sql = &self.sql[table as usize].page;
        let mut after: Option<Vec<u8>> = None;
        loop {
            // A page at a time, so that the visitor may use the backend.
            let rows = self.with_conn(|c| {
                c.query_typed(
                    sql,
                    &[
                        (&from, Type::BYTEA),
                        (&to, Type::BYTEA),
                        (&after, Type::BYTEA),
                        (&PAGE, Type::INT8),
                    ],
                )
            })?;
            for r in &rows {
                let (k, v): (&[u8], &[u8]) = (cell(r, 0)?, cell(r, 1)?);
                if !visit(k, v)? {
                    return Ok(());
                }
            }
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
            after = rows.last().map(|r| cell::<Vec<u8>>(r, 0)).transpose()?;
        }
    }

    fn last(&self, table: Table, at: Option<&[u8]>) -> Result<Option<Row>> {
        let s = &self.sql[table as usize];
        let rows = match at {
            None => self.with_conn(|c| c.query_typed(&s.last, &[]))?,
            Some(at) => self.with_conn(|c| c.query_typed(&s.last_at, &[(&at, Type::BYTEA)]))?,
        };
        rows.first()
            .map(|r| Ok((cell(r, 0)?, cell(r, 1)?)))
            .transpose()
    }

    fn apply(&self, writes: Writes, _atomic: bool) -> Result<()> {
        // Under a lock: kept for the next statement or the commit (the
        // transaction makes them atomic either way).
        let mut writes = Some(writes);
        HELD.with(|h| {
            if let Some(x) = h.borrow_mut().iter_mut().find(|x| x.backend == self.id) {
                if let Some(w) = writes.take() {
                    x.pending.extend(w.0);
                }
            }
        });
        let Some(writes) = writes else {
            return Ok(());
        };
        // Outside a lock: the same statements in one simple query, which
        // PostgreSQL runs as one implicit transaction (atomic).
        let sql = apply_literal(writes.0);
        if sql.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| c.simple_query(&sql)).map(|_| ())
    }

    fn flush(&self) -> Result<()> {
        // Under a lock: commit the transaction now, synchronously. A
        // synchronous commit flushes the WAL up to its own record, and so
        // every earlier asynchronous commit with it.
        let held = HELD.with(|h| {
            let mut h = h.borrow_mut();
            h.iter_mut()
                .find(|x| x.backend == self.id)
                .map(|x| (x.in_txn || !x.pending.is_empty(), x.commit(true)))
        });
        let synced_here = match held {
            Some((was_open, r)) => {
                r.map_err(|e| self.err(pg_message(&e)))?;
                was_open
            }
            None => false,
        };
        let unsynced = UNSYNCED.with(|u| {
            let mut u = u.borrow_mut();
            let had = u.contains(&self.id);
            u.retain(|&b| b != self.id);
            had
        });
        if unsynced && !synced_here {
            // Outside a lock, after asynchronous commits: a one-row write
            // committed synchronously is the barrier.
            self.with_conn(|c| {
                c.query_typed(
                    "INSERT INTO bioseal.meta (k, v) VALUES ('sync', '') \
                     ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                    &[],
                )
            })?;
        }
        Ok(())
    }

    fn relax(&self) {
        HELD.with(|h| {
            if let Some(x) = h.borrow_mut().iter_mut().find(|x| x.backend == self.id) {
                x.relaxed = true;
            }
        });
    }

    fn lock_buckets(
        &self,
        buckets: &[u32],
        prefetch: &[(u64, usize)],
    ) -> Result<Option<RemoteLock>> {
        // The epoch gate (shared) first, then the buckets.
        let keys: Vec<i32> = std::iter::once(Ok(GATE_SHARED))
            .chain(
                buckets
                    .iter()
                    .map(|&b| i32::try_from(b).map_err(|_| Error::tampered("bucket index"))),
            )
            .collect::<Result<_>>()?;
        let mut parts = Vec::new();
        for &(off, len) in prefetch {
            parts.extend(units(off, &vec![0u8; len])?.into_iter().map(|u| u.0));
        }
        let ns = self.namespace.load(Ordering::Relaxed);
        self.lock_in(ns, &keys, false, &parts).map(Some)
    }

    fn lock_audit(&self) -> Result<Option<RemoteLock>> {
        self.lock_store().map(Some)
    }

    fn lock_epoch(&self) -> Result<Option<RemoteLock>> {
        self.lock_epoch_all().map(Some)
    }

    fn raise_mark(&self, value: &[u8]) -> Result<()> {
        let key = super::mark_key();
        self.with_conn(|c| {
            c.query_typed(
                "INSERT INTO bioseal.meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE \
                 SET v = EXCLUDED.v WHERE substring(bioseal.meta.v from 1 for 8) < substring(EXCLUDED.v from 1 for 8)",
                &[(&key, Type::BYTEA), (&value, Type::BYTEA)],
            )
        })
        .map(|_| ())
    }

    fn shared(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
