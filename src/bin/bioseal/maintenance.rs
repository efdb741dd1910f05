//! Store-wide commands: sweep, audit, stats, epoch, backup, restore.

use super::*;

/// `bioseal sweep [--dry-run]`.
pub(crate) fn sweep(cli: &Cli, dry_run: &bool) -> R<u8> {
    let (store, _) = open(cli)?;
    let spinner = spinner("sweeping");
    if *dry_run {
        let n = store.due()?;
        spinner.finish_and_clear();
        println!("{n} subjects are due; nothing was destroyed (dry run)");
    } else {
        let r = store.sweep()?;
        spinner.finish_and_clear();
        println!(
            "destroyed {} subjects ({} index entries examined, {} buckets rotated) in {:.3} s",
            r.expired,
            r.examined,
            r.buckets_rotated,
            r.took.as_secs_f64()
        );
        if let Some(e) = r.epoch_rolled {
            println!("key epoch was due: rolled to epoch {e}");
        }
    }
    Ok(0)
}

/// `bioseal epoch status|roll`.
pub(crate) fn epoch(cli: &Cli, action: &EpochCmd) -> R<u8> {
    if let EpochCmd::Import { root_key_file } = action {
        let epochs = cli
            .epochs
            .as_deref()
            .ok_or_else(|| input("epoch import needs --epochs FILE (the new epoch file)"))?;
        let key = RootKey::from_file(root_key_file)?;
        bioseal::FileEpochProvider::open(epochs)?.import_fixed_key(&key)?;
        println!(
            "imported {} as epoch 0 into {}; open the store with --epochs, run `bioseal epoch roll`, \
             then destroy {} (it opens every backup of epoch 0)",
            root_key_file.display(),
            epochs.display(),
            root_key_file.display()
        );
        return Ok(0);
    }
    let (store, _) = open(cli)?;
    let st = match action {
        EpochCmd::Status | EpochCmd::Import { .. } => store.epoch_status()?,
        EpochCmd::Roll => {
            let st = store.roll_epoch()?;
            println!(
                "rolled to epoch {}; the previous epoch's key is destroyed",
                st.epoch
            );
            st
        }
    };
    println!("epoch              {}", st.epoch);
    println!("started            {}", when(st.started));
    println!("age                {} s", st.age.as_secs());
    println!("due                {}", when(st.due));
    println!(
        "oldest restorable  backups taken at or after {}",
        when(st.oldest_restorable)
    );
    match st.destruction_delay {
        Some(d) => println!("destruction delay  {} s", d.as_secs()),
        None => println!("destruction delay  never (a fixed root key cannot be destroyed)"),
    }
    println!("ledger entries     {}", st.ledger_entries);
    Ok(0)
}

/// `bioseal backup --out DIR`.
pub(crate) fn backup(cli: &Cli, out: &Path) -> R<u8> {
    let (store, settings) = open(cli)?;
    let b = store.backup(out)?;
    // The settings mirror goes with it (the restore reads it back).
    write_settings(out, &settings)?;
    println!(
        "backup {}: {} rows, {} bytes, epoch {}, mark {}; restorable until epoch {} is rolled",
        out.display(),
        b.rows,
        b.bytes,
        b.epoch,
        b.mark,
        b.epoch
    );
    Ok(0)
}

/// `bioseal restore --from DIR`.
pub(crate) fn restore(cli: &Cli, from: &Path) -> R<u8> {
    let dir = store_dir(cli)?;
    // The settings mirror travels with the data directory; a restore
    // reads it from the backup's copy if the store directory is gone.
    let settings = read_settings(from)?;
    let (store, r) = Store::restore(from, config(cli, &settings)?)?;
    drop(store);
    if !is_shared(cli) {
        write_settings(dir, &settings)?;
    }
    println!(
        "restored {} rows into {}; {} revocation-ledger entries replayed",
        r.rows,
        store_name(cli)?,
        r.replayed
    );
    Ok(0)
}

/// `bioseal audit verify|export`.
pub(crate) fn audit(cli: &Cli, action: &AuditCmd) -> R<u8> {
    let (store, _) = open(cli)?;
    match action {
        AuditCmd::Verify => {
            let head = store.audit().verify_chain()?;
            println!(
                "audit chain intact: {} entries, head {}",
                head.entries,
                hex(&head.last_mac)
            );
        }
        AuditCmd::Export { out } => {
            let n = match out {
                Some(path) => {
                    let mut o = std::fs::OpenOptions::new();
                    o.write(true).create(true).truncate(true);
                    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
                    let f = o
                        .open(path)
                        .map_err(|e| input(format!("{}: {e}", path.display())))?;
                    // An existing file keeps its mode on open: set it.
                    f.set_permissions(std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| input(format!("{}: {e}", path.display())))?;
                    store.audit().export(std::io::BufWriter::new(f))?
                }
                None => match store.audit().export(std::io::stdout().lock()) {
                    Ok(n) => n,
                    // `bioseal audit export | head`: the reader is
                    // gone; stop quietly.
                    Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        return Ok(0)
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            eprintln!("exported {n} entries");
        }
    }
    Ok(0)
}

/// `bioseal stats`.
pub(crate) fn stats(cli: &Cli) -> R<u8> {
    let (store, settings) = open(cli)?;
    let s = store.stats()?;
    println!("subjects          {}", s.subjects);
    println!("buckets           {}", s.buckets);
    println!("pending shreds    {}", s.pending_shreds);
    println!(
        "key generations   {}..={}",
        s.generation_min, s.generation_max
    );
    println!(
        "model             {} ({} dimensions)",
        settings.model, settings.dim
    );
    println!(
        "threshold         {} (cosine, from the keyring)",
        store.threshold().as_cosine()
    );
    if let Some(fmr) = settings.target_fmr {
        println!("target FMR        {fmr:e}");
    }
    if let Some(src) = &settings.calibration_source {
        println!("calibrated from   {src}");
    }
    if let Some(dir) = store.dir() {
        println!("disk use          {} bytes", disk_use(dir));
    }
    Ok(0)
}

pub(crate) fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += disk_use(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
