//! A FUSE filesystem for power-cut tests: it holds every file in memory
//! twice, as written and as last made durable, and a power cut reverts
//! every file to its durable bytes.
//!
//! The durability model (stricter than a real disk in one way, kinder in
//! another):
//! - a file's bytes (contents and length) become durable only when that
//!   file is `fsync`ed or `fdatasync`ed; `sync_file_range`, `close` and the
//!   passing of time make nothing durable;
//! - directory operations (create, mkdir, unlink, rename) are durable when
//!   they return, as on a filesystem that journals metadata in order; a
//!   file created and never synced survives a cut empty.
//!
//! [`PowerFs::arm`] freezes the filesystem after a given number of mutating
//! operations (writes, truncations, syncs, directory changes): every later
//! one fails with `EIO` and makes nothing durable, so the cut lands at an
//! exact point of the I/O sequence. [`PowerFs::cut`] then reverts the files.
//! Reads and writes bypass the kernel's page cache (`direct_io`, zero TTLs),
//! and the tests remount after a cut, so nothing stale is served.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

struct Node {
    kind: FileType,
    perm: u16,
    /// Bytes as written (files).
    data: Vec<u8>,
    /// Bytes as of the last fsync/fdatasync (files).
    durable: Vec<u8>,
    /// Entries (directories).
    children: BTreeMap<OsString, u64>,
}

struct State {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// Mutating operations so far.
    ops: u64,
    /// Freeze when `ops` reaches this.
    freeze_at: Option<u64>,
    frozen: bool,
    /// Syncs that made something durable.
    syncs: u64,
}

/// The filesystem; clones share one state (the mounted copy and the test's).
#[derive(Clone)]
pub struct PowerFs(Arc<Mutex<State>>);

impl Default for PowerFs {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: FileType::Directory,
                perm: 0o755,
                data: Vec::new(),
                durable: Vec::new(),
                children: BTreeMap::new(),
            },
        );
        PowerFs(Arc::new(Mutex::new(State {
            nodes,
            next: ROOT + 1,
            ops: 0,
            freeze_at: None,
            frozen: false,
            syncs: 0,
        })))
    }
}

impl PowerFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mount at `dir`; unmounted when the session is dropped.
    pub fn mount(&self, dir: &std::path::Path) -> std::io::Result<fuser::BackgroundSession> {
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![fuser::MountOption::FSName("bioseal-powercut".into())];
        fuser::spawn_mount(self.clone(), dir, &cfg)
    }

    /// Freeze after `more` further mutating operations.
    pub fn arm(&self, more: u64) {
        let mut s = self.state();
        s.freeze_at = Some(s.ops + more);
    }

    /// Freeze now.
    pub fn freeze(&self) {
        self.state().frozen = true;
    }

    pub fn is_frozen(&self) -> bool {
        self.state().frozen
    }

    /// Mutating operations so far.
    #[allow(dead_code)]
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Syncs so far that made something durable.
    #[allow(dead_code)]
    pub fn syncs(&self) -> u64 {
        self.state().syncs
    }

    /// Add a directory or file; its attributes.
    fn new_node(
        &self,
        parent: INodeNo,
        name: &OsStr,
        kind: FileType,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        let mut s = self.state();
        let ino = s.add(parent.0, name, kind, (mode & 0o7777) as u16)?;
        s.attr(ino).ok_or(Errno::EIO)
    }

    /// The power cut: every file back to its durable bytes; unfreeze.
    pub fn cut(&self) {
        let mut s = self.state();
        for n in s.nodes.values_mut() {
            if n.kind == FileType::RegularFile {
                n.data = n.durable.clone();
            }
        }
        s.frozen = false;
        s.freeze_at = None;
    }
}

impl State {
    /// Count a mutating operation; false once frozen.
    fn mutate(&mut self) -> bool {
        if self.frozen {
            return false;
        }
        self.ops += 1;
        if self.freeze_at.is_some_and(|f| self.ops > f) {
            self.frozen = true;
            return false;
        }
        true
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let size = n.data.len() as u64;
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: n.kind,
            perm: n.perm,
            nlink: if n.kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    fn add(&mut self, parent: u64, name: &OsStr, kind: FileType, perm: u16) -> Result<u64, Errno> {
        if self.child(parent, name).is_some() {
            return Err(Errno::EEXIST);
        }
        if !self.mutate() {
            return Err(Errno::EIO);
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm,
                data: Vec::new(),
                durable: Vec::new(),
                children: BTreeMap::new(),
            },
        );
        self.nodes
            .get_mut(&parent)
            .ok_or(Errno::ENOENT)?
            .children
            .insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name).ok_or(Errno::ENOENT)?;
        let n = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        if dir && !n.children.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        if !self.mutate() {
            return Err(Errno::EIO);
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children.remove(name);
        }
        self.nodes.remove(&ino);
        Ok(())
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state();
        match s.child(parent.0, name).and_then(|i| s.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        if !s.nodes.contains_key(&ino.0) {
            return reply.error(Errno::ENOENT);
        }
        if (size.is_some() || mode.is_some()) && !s.mutate() {
            return reply.error(Errno::EIO);
        }
        if let Some(n) = s.nodes.get_mut(&ino.0) {
            if let Some(size) = size {
                n.data.resize(size as usize, 0);
            }
            if let Some(mode) = mode {
                n.perm = (mode & 0o7777) as u16;
            }
        }
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.new_node(parent, name, FileType::Directory, mode & !umask) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.new_node(parent, name, FileType::RegularFile, mode & !umask) {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let Some(ino) = s.child(parent.0, name) else {
            return reply.error(Errno::ENOENT);
        };
        if !s.mutate() {
            return reply.error(Errno::EIO);
        }
        if let Some(old) = s.child(newparent.0, newname) {
            s.nodes.remove(&old);
        }
        if let Some(p) = s.nodes.get_mut(&parent.0) {
            p.children.remove(name);
        }
        match s.nodes.get_mut(&newparent.0) {
            Some(p) => {
                p.children.insert(newname.to_owned(), ino);
                reply.ok()
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.state().nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.state();
        match s.nodes.get(&ino.0) {
            Some(n) => {
                let start = (offset as usize).min(n.data.len());
                let end = (start + size as usize).min(n.data.len());
                reply.data(&n.data[start..end]);
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        if !s.nodes.contains_key(&ino.0) {
            return reply.error(Errno::ENOENT);
        }
        if !s.mutate() {
            return reply.error(Errno::EIO);
        }
        match s.nodes.get_mut(&ino.0) {
            Some(n) => {
                let end = offset as usize + data.len();
                if n.data.len() < end {
                    n.data.resize(end, 0);
                }
                n.data[offset as usize..end].copy_from_slice(data);
                reply.written(data.len() as u32);
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        if !s.mutate() {
            return reply.error(Errno::EIO);
        }
        s.syncs += 1;
        match s.nodes.get_mut(&ino.0) {
            Some(n) => {
                n.durable = n.data.clone();
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        if !s.mutate() {
            return reply.error(Errno::EIO);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.state();
        let Some(n) = s.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for (name, &child) in &n.children {
            if let Some(c) = s.nodes.get(&child) {
                entries.push((child, c.kind, name.clone()));
            }
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 4096, 255, 4096);
    }
}
