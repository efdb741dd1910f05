//! TLS to the database, through rustls, when the URL asks for it.
//!
//! `sslmode=require` (also `verify-ca`, `verify-full`; `prefer` is treated
//! as `require`): the connection is TLS, and the server's certificate is
//! always verified, chain and host name, against `sslrootcert=FILE` (PEM)
//! if the URL names one, else the Mozilla roots (`webpki-roots`). Stricter
//! than libpq's `require`, on purpose: an unverified TLS connection is one
//! an active attacker reads. `sslmode=disable` or none: no TLS (a Unix
//! socket, or a network the operator protects otherwise).

use crate::error::{Error, Result};
use std::sync::Arc;

/// How connections are made.
#[derive(Clone)]
pub(crate) enum Tls {
    /// Plain connections.
    None,
    /// TLS, with the server verified.
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    /// Connect with `config`.
    pub(crate) fn connect(
        &self,
        config: &postgres::Config,
    ) -> std::result::Result<postgres::Client, postgres::Error> {
        match self {
            Tls::None => config.connect(postgres::NoTls),
            Tls::Rustls(m) => config.connect(m.clone()),
        }
    }
}

/// Split bioseal's own URL parameters off `url` (the client library does
/// not know them): returns the URL for the client and the TLS setting.
pub(crate) fn prepare(url: &str) -> Result<(String, Tls)> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut keep = Vec::new();
    let mut root_file = None;
    let mut tls = false;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "sslrootcert" => root_file = Some(percent_decode(v)),
            "sslmode" => {
                tls = match v {
                    "disable" => false,
                    "prefer" | "require" | "verify-ca" | "verify-full" => true,
                    other => {
                        return Err(Error::Config(format!(
                            "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                        )))
                    }
                };
                // The client library sees `disable` either way: the TLS
                // decision is made here.
                keep.push("sslmode=disable".to_owned());
            }
            _ => keep.push(kv.to_owned()),
        }
    }
    let url = if keep.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", keep.join("&"))
    };
    if !tls {
        return Ok((url, Tls::None));
    }
    let url = url.replace("sslmode=disable", "sslmode=require");
    let mut roots = rustls::RootCertStore::empty();
    match root_file {
        Some(path) => {
            let pem = std::fs::read(&path)
                .map_err(|e| Error::Config(format!("cannot read sslrootcert {path}: {e}")))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    Error::Config(format!("sslrootcert {path}: not PEM certificates: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    Error::Config(format!("sslrootcert {path}: unusable certificate: {e}"))
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(Error::Config(format!("sslrootcert {path}: no certificate")));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Config(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((
        url,
        Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(config)),
    ))
}

/// `%XX` escapes of a URL parameter value.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let hex = |x: u8| (x as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
