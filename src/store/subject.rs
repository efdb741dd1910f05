//! A subject's record: read and open it, seal and queue its writes.

use super::*;

impl Store {
    /// Read and open a subject's record and state (caller holds the lock).
    /// One unit of work reads the record and the bucket's key table (and,
    /// shared mode, the index pointer).
    pub(super) fn load_subject(&self, p: &Pseudonym, b: u32, key: &[u8]) -> Result<Option<Loaded>> {
        let (tk, pk) = (storage::key_table_key(b), storage::deadline_ptr_key(b, p));
        // The index pointer is needed only by a write (at most one a day on
        // the match path): read with the rest where a read is a round trip
        // (shared mode), and only when written otherwise.
        let mut keys = vec![(Table::Records, key), (Table::Keys, &tk[..])];
        if self.db.shared() {
            keys.push((Table::Records, &pk[..]));
        }
        let mut got = self.db.get_many(&keys)?.into_iter();
        let (Some(rec), Some(table)) = (got.next(), got.next()) else {
            return Err(Error::tampered("storage answer"));
        };
        let index_day = got.next().map(|ptr| ptr.as_deref().and_then(be_u32));
        let Some(rec) = rec.map(|v| SubjectRecord::decode(&v)).transpose()? else {
            return Ok(None);
        };
        let table = table.ok_or(Error::tampered("bucket key table (missing)"))?;
        let (generation, wrapped) = DekTable::find(&table, p)?
            .ok_or(Error::tampered("bucket key table (no entry for a record)"))?;
        let dek = self.unwrap_dek(p, b, generation, &wrapped)?;
        let dek_key = AeadKey::new(&dek);
        let payload = self.open_payload(p, &dek_key, &rec)?;
        let plain = dek_key
            .open(&state_aad(&self.keyring.header().store_id, p), &rec.state)
            .map_err(|_| Error::tampered("subject state"))?;
        let state = SubjectState::decode(&plain)?;
        Ok(Some(Loaded {
            dek,
            payload,
            state,
            sealed_payload: rec.payload,
            sealed_templates: rec.templates,
            index_day,
        }))
    }

    /// Queue the writes of a subject: its record (payload re-sealed when
    /// `reseal`, else kept as loaded; state always re-sealed) and its
    /// retention-index entry.
    ///
    /// Order (every prefix is a state the store handles): the new index
    /// entry first, so that the index never lists a subject later than its
    /// deadline; then the record, the index pointer, and last the removal of
    /// the old index entry. A crash can leave an index entry that no pointer
    /// names; [`Store::sweep`] removes it when it visits it.
    pub(super) fn put_subject(
        &self,
        w: &mut Writes,
        p: &Pseudonym,
        b: u32,
        l: &Loaded,
        reseal: bool,
    ) -> Result<()> {
        let store_id = self.keyring.header().store_id;
        let key = AeadKey::new(&l.dek);
        let day = day_of(self.deadline(&l.payload.consent, &l.state).unix_secs());
        let ptr = storage::deadline_ptr_key(b, p);
        let old = match l.index_day {
            Some(known) => known,
            None => self
                .db
                .get(Table::Records, &ptr)?
                .as_deref()
                .and_then(be_u32),
        };
        if old != Some(day) {
            w.insert(&storage::deadline_key(day, b, p)[..], &[][..]);
        }
        let payload = if reseal || l.sealed_payload.is_empty() {
            key.seal(&payload_aad(&store_id, p), &l.payload.encode()?)?
        } else {
            l.sealed_payload.clone()
        };
        let rec = SubjectRecord {
            payload,
            templates: l.sealed_templates.clone(),
            state: key.seal(&state_aad(&store_id, p), &l.state.encode()?)?,
        };
        w.insert(&storage::subject_key(b, p)[..], rec.encode());
        if old != Some(day) {
            w.insert(&ptr[..], &day.to_be_bytes()[..]);
            if let Some(old) = old {
                w.remove(&storage::deadline_key(old, b, p)[..]);
            }
        }
        Ok(())
    }

    /// Write a change that must not be undone, durably, with its audit
    /// entry: the subject re-sealed under a fresh DEK and its bucket rotated
    /// ([`Store::rekey_subject`]), then the entry and one flush.
    pub(super) fn commit_subject(
        &self,
        p: &Pseudonym,
        b: u32,
        l: Loaded,
        now: Timestamp,
        entry: AuditEntry,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        self.rekey_subject(p, b, l, guard)?;
        self.log(now, entry.subject(p).outcome(AuditOutcome::Ok))?;
        self.flush()
    }

    /// Queue removal of everything stored for a subject, the record first
    /// (once it is gone, the subject is unknown; what follows is cleanup).
    pub(super) fn remove_subject(&self, w: &mut Writes, b: u32, p: &Pseudonym) -> Result<()> {
        w.remove(&storage::subject_key(b, p)[..]);
        self.remove_index(w, b, p)
    }

    pub(super) fn open_payload(
        &self,
        p: &Pseudonym,
        dek: &AeadKey,
        rec: &SubjectRecord,
    ) -> Result<SubjectPayload> {
        let aad = payload_aad(&self.keyring.header().store_id, p);
        let plain = dek
            .open(&aad, &rec.payload)
            .map_err(|_| Error::tampered("subject payload"))?;
        SubjectPayload::decode(&plain, self.dim)
    }
}
