//! Commands about one subject: init, enroll (one or bulk), verify,
//! add-template, reset-attempts, revoke, consent.

use super::*;

/// `bioseal init`.
pub(crate) fn init(cli: &Cli, model: &str, dim: &usize, threshold: &f32, buckets: &u32) -> R<u8> {
    let dir = store_dir(cli)?;
    let not_empty = || {
        if !is_shared(cli) && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(input(format!(
                "{} is not empty: refusing to create a store there",
                dir.display()
            )));
        }
        Ok(())
    };
    let (key, what): (Box<dyn bioseal::KeyProvider>, String) = if cli.pkcs11.is_some() {
        not_empty()?;
        let p = provider(cli)?;
        let what = p.describe();
        (p, what)
    } else {
        let key_file = key_path(cli)?;
        if key_file.exists() {
            return Err(input(format!(
                "{} exists: refusing to overwrite a key file",
                key_file.display()
            )));
        }
        not_empty()?;
        key_dir(cli)?;
        if cli.epochs.is_some() {
            let p = bioseal::FileEpochProvider::open(key_file)?;
            (Box::new(p), format!("epoch keys {}", key_file.display()))
        } else {
            let key = RootKey::generate()?;
            key.write_new_file(key_file)?;
            (Box::new(key), format!("root key {}", key_file.display()))
        }
    };
    let store = Store::open(
        StoreConfig::new(dir, key)
            .key_dir(key_dir(cli)?)
            .model(model, *dim)
            .threshold(Threshold::cosine(*threshold))
            .buckets(*buckets),
    )?;
    drop(store);
    write_settings(
        &settings_dir(cli)?,
        &Settings {
            model: model.to_owned(),
            dim: *dim,
            threshold: *threshold,
            buckets: *buckets,
            target_fmr: None,
            calibration_source: None,
        },
    )?;
    println!(
        "created store {} (model {model}, {dim} dimensions, {buckets} buckets); {what}",
        store_name(cli)?,
    );
    Ok(0)
}

/// `bioseal enroll`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enroll(
    cli: &Cli,
    subject: &Option<String>,
    embedding: &Option<PathBuf>,
    purposes: &[String],
    expires: &Option<String>,
    evidence: &Option<PathBuf>,
    jsonl: &Option<PathBuf>,
    user_key: &Option<PathBuf>,
) -> R<u8> {
    if let Some(path) = jsonl {
        return bulk_enroll(cli, path);
    }
    let (Some(subject), Some(embedding), Some(expires), Some(evidence)) =
        (subject, embedding, expires, evidence)
    else {
        return Err(Fail(2, "missing arguments".into()));
    };
    let settings = read_settings(&settings_dir(cli)?)?;
    let emb = read_embedding(embedding, settings.dim)?;
    let consent = consent_from(purposes, expires, &sha256_file(evidence)?)?;
    let user_key = user_key.as_deref().map(read_user_key).transpose()?;
    let (store, _) = open_with(cli, settings)?;
    match &user_key {
        Some(k) => {
            store.enroll_with(subject, emb, consent, k)?;
            println!("enrolled {subject} (split custody: the user key is needed to verify)");
        }
        None => {
            store.enroll(subject, emb, consent)?;
            println!("enrolled {subject}");
        }
    }
    Ok(0)
}

/// `bioseal verify`: exit 0 on `match`, 1 on `no-match`.
pub(crate) fn verify(
    cli: &Cli,
    subject: &str,
    purpose: &str,
    embedding: &Path,
    user_key: &Option<PathBuf>,
) -> R<u8> {
    let settings = read_settings(&settings_dir(cli)?)?;
    let probe = read_embedding(embedding, settings.dim)?;
    let purpose = Purpose::new(purpose.to_owned()).map_err(|e| input(e.to_string()))?;
    let user_key = user_key.as_deref().map(read_user_key).transpose()?;
    let (store, _) = open_with(cli, settings)?;
    let decision = match &user_key {
        Some(k) => store.verify_with(subject, &purpose, probe, k)?,
        None => store.verify(subject, &purpose, probe)?,
    };
    match decision {
        Decision::Match => {
            println!("match");
            Ok(0)
        }
        Decision::NoMatch => {
            println!("no-match");
            Ok(1)
        }
    }
}

/// `bioseal add-template`: exit 0 when added, 1 on `no-match`.
pub(crate) fn add_template(
    cli: &Cli,
    subject: &str,
    purpose: &str,
    probe: &Path,
    embedding: &Path,
    user_key: &Option<PathBuf>,
) -> R<u8> {
    let settings = read_settings(&settings_dir(cli)?)?;
    let probe = read_embedding(probe, settings.dim)?;
    let new = read_embedding(embedding, settings.dim)?;
    let purpose = Purpose::new(purpose.to_owned()).map_err(|e| input(e.to_string()))?;
    let user_key = user_key.as_deref().map(read_user_key).transpose()?;
    let (store, _) = open_with(cli, settings)?;
    let decision = match &user_key {
        Some(k) => store.add_template_with(subject, &purpose, probe, new, k)?,
        None => store.add_template(subject, &purpose, probe, new)?,
    };
    match decision {
        Decision::Match => {
            println!("added");
            Ok(0)
        }
        Decision::NoMatch => {
            println!("no-match");
            Ok(1)
        }
    }
}

/// `bioseal rekey`: change a split-custody subject's user key.
pub(crate) fn rekey(cli: &Cli, subject: &str, old: &Path, new: &Path) -> R<u8> {
    let (old, new) = (read_user_key(old)?, read_user_key(new)?);
    let (store, _) = open(cli)?;
    store.rekey(subject, &old, &new)?;
    println!("changed the user key of {subject}; the old key opens nothing any more");
    Ok(0)
}

/// `bioseal move-to-split`: a server-custody subject into split custody.
pub(crate) fn move_to_split(cli: &Cli, subject: &str, key: &Path) -> R<u8> {
    let key = read_user_key(key)?;
    let (store, _) = open(cli)?;
    store.move_to_split_custody(subject, &key)?;
    println!("moved {subject} to split custody: the user key is needed to verify");
    Ok(0)
}

/// `bioseal reset-attempts`.
pub(crate) fn reset_attempts(cli: &Cli, subject: &str) -> R<u8> {
    let (store, _) = open(cli)?;
    store.reset_attempts(subject)?;
    println!("reset the failed attempts of {subject}");
    Ok(0)
}

/// `bioseal revoke`.
pub(crate) fn revoke(cli: &Cli, subject: &str) -> R<u8> {
    let (store, _) = open(cli)?;
    let r = store.revoke(subject)?;
    match r.status {
        ShredStatus::Shredded { at } => {
            println!("revoked {subject}; shredded at {}", when(at))
        }
        ShredStatus::Pending => println!("revoked {subject}; shred pending"),
    }
    match r.backups_inert_by {
        Some(t) => println!(
            "backups inert by {} (end of the key epoch + the provider's delay)",
            when(t)
        ),
        None => println!(
            "backups never become inert: a fixed root key cannot be destroyed (use --epochs)"
        ),
    }
    Ok(0)
}

pub(crate) fn consent_cmd(cli: &Cli, action: &ConsentCmd) -> R<u8> {
    let (store, _) = open(cli)?;
    match action {
        ConsentCmd::Show { subject } => {
            let s = store.consent_status(subject)?;
            let purposes: Vec<&str> = s.purposes.iter().map(Purpose::as_str).collect();
            println!("purposes          {}", purposes.join(", "));
            if let Some(g) = s.granted_at {
                println!("granted           {}", when(g));
            }
            println!("expires           {}", when(s.expires_at));
            println!("last interaction  {}", when(s.last_interaction));
            println!("deadline          {}", when(s.deadline));
            println!("policy version    {}", s.policy_version);
            println!(
                "custody           {}",
                match s.custody {
                    bioseal::Custody::Server => "server",
                    bioseal::Custody::Split =>
                        "split (only the person's user key opens the templates)",
                }
            );
            if let Some(e) = s.evidence {
                println!("evidence sha256   {}", hex(&e));
            }
        }
        ConsentCmd::Renew {
            subject,
            purposes,
            expires,
            evidence,
        } => {
            let consent = consent_from(purposes, expires, &sha256_file(evidence)?)?;
            let s = store.renew_consent(subject, consent)?;
            println!("renewed {subject}; deadline {}", when(s.deadline));
        }
        ConsentCmd::Withdraw { subject, purpose } => {
            let purpose = Purpose::new(purpose.to_owned()).map_err(|e| input(e.to_string()))?;
            match store.withdraw_purpose(subject, &purpose)? {
                Withdrawal::Remaining(rest) => {
                    let rest: Vec<&str> = rest.iter().map(Purpose::as_str).collect();
                    println!(
                        "withdrew {}; remaining: {}",
                        purpose.as_str(),
                        rest.join(", ")
                    );
                }
                Withdrawal::Revoked(_) => {
                    println!("withdrew the last purpose; {subject} revoked and shredded")
                }
            }
        }
    }
    Ok(0)
}

#[derive(Deserialize)]
pub(crate) struct BulkLine {
    pub(crate) subject: String,
    pub(crate) embedding: Vec<f32>,
    pub(crate) purposes: Vec<String>,
    pub(crate) expires: String,
    pub(crate) evidence_sha256: String,
}

pub(crate) fn bulk_enroll(cli: &Cli, path: &Path) -> R<u8> {
    let (store, _) = open(cli)?;
    let lines = read_lines(path)?;
    let bar = progress(lines.len() as u64, "enrolling");
    let (mut ok, mut failed) = (0usize, 0usize);
    for chunk in lines.chunks(1000).enumerate() {
        let (c, chunk) = chunk;
        let mut items = Vec::new();
        let mut line_nos = Vec::new();
        for (i, text) in chunk.iter().enumerate() {
            let n = c * 1000 + i + 1;
            let parsed = serde_json::from_str::<BulkLine>(text)
                .map_err(|e| input(format!("malformed JSON: {e}")))
                .and_then(|l| {
                    let digest = parse_hex32(&l.evidence_sha256)?;
                    let consent = consent_from(&l.purposes, &l.expires, &digest)?;
                    Ok((l.subject, Embedding::new(l.embedding), consent))
                });
            match parsed {
                Ok(item) => {
                    items.push(item);
                    line_nos.push(n);
                }
                Err(Fail(_, msg)) => {
                    eprintln!("line {n}: {msg}");
                    failed += 1;
                }
            }
        }
        for (n, r) in line_nos.iter().zip(store.enroll_many(items)?) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    eprintln!("line {n}: {e}");
                    failed += 1;
                }
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    println!("enrolled {ok} subjects; {failed} lines failed");
    Ok(if failed > 0 { 3 } else { 0 })
}
