//! A pure decoder for PostgreSQL's `pgoutput` logical replication messages (protocol version 1).
//!
//! `pgwire-replication` hands the payload of each `XLogData` message over as raw bytes; this module
//! turns them into [`Message`] values. It never panics: every read is bounds-checked and malformed
//! input comes back as a [`DecodeError`] naming the offset, which keeps it safe to fuzz.
//! Reference: "Logical Replication Message Formats" in the PostgreSQL documentation.

use std::fmt;

/// One column value inside a tuple, by the marker byte that precedes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value whose bytes were not sent; the row must be re-read.
    UnchangedToast,
    /// `t`: the value in PostgreSQL's text format, borrowed from the message (no copy: most
    /// bytes are answers the re-read fetches anyway).
    Text(&'a [u8]),
    /// `b`: the value in binary format (only with the `binary` option).
    Binary(&'a [u8]),
}

impl Value<'_> {
    /// The text of a `t` value as UTF-8, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// A column of a relation as described by a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// True when the column is part of the replica identity key.
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A `Relation` message: the shape of a table, sent before its first change in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID, referenced by later change messages.
    pub id: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<Column>,
}

/// Which old image an `Update` or `Delete` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: only the replica identity key columns.
    Key,
    /// `O`: the whole old row (replica identity FULL).
    Full,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `B`: start of a transaction.
    Begin {
        final_lsn: u64,
        commit_ts: i64,
        xid: u32,
    },
    /// `C`: end of a transaction.
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    /// `O`: the origin of the following changes.
    Origin { lsn: u64, name: String },
    /// `R`: a relation's shape.
    Relation(Relation),
    /// `Y`: a data type's name.
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    /// `I`: a new row.
    Insert { relation: u32, new: Vec<Value<'a>> },
    /// `U`: a changed row, with the old image when the replica identity provides one.
    Update {
        relation: u32,
        old: Option<(OldKind, Vec<Value<'a>>)>,
        new: Vec<Value<'a>>,
    },
    /// `D`: a removed row (key columns, or the full row with replica identity FULL).
    Delete {
        relation: u32,
        old: (OldKind, Vec<Value<'a>>),
    },
    /// `T`: one or more truncated relations.
    Truncate { options: u8, relations: Vec<u32> },
    /// `M`: a logical decoding message from `pg_logical_emit_message`.
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: &'a [u8],
    },
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset where decoding stopped.
    pub offset: usize,
    /// What was expected there.
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed pgoutput message at byte {}: {}",
            self.offset, self.reason
        )
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            offset: self.pos,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => self.err(format!(
                "need {n} more bytes, {} left",
                self.buf.len() - self.pos
            )),
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    /// A NUL-terminated string.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return self.err("string without NUL terminator");
        };
        let s = match std::str::from_utf8(&rest[..nul]) {
            Ok(s) => s.to_owned(),
            Err(_) => return self.err("string is not valid UTF-8"),
        };
        self.pos += nul + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Value<'a>>, DecodeError> {
        let n = self.u16()? as usize;
        // Each column takes at least one byte, so a count beyond the rest is malformed; checking
        // first keeps a hostile count from reserving memory.
        if n > self.buf.len() - self.pos {
            return self.err(format!(
                "tuple claims {n} columns, too many for the bytes left"
            ));
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.take(len)?)
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    Value::Binary(self.take(len)?)
                }
                other => {
                    self.pos -= 1;
                    return self.err(format!("unknown tuple value marker {:?}", other as char));
                }
            };
            values.push(v);
        }
        Ok(values)
    }

    fn expect_new(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            b'N' => Ok(()),
            other => {
                self.pos -= 1;
                self.err(format!(
                    "expected 'N' before new tuple, got {:?}",
                    other as char
                ))
            }
        }
    }

    fn finish<T>(&self, v: T) -> Result<T, DecodeError> {
        if self.pos != self.buf.len() {
            return self.err(format!("{} trailing bytes", self.buf.len() - self.pos));
        }
        Ok(v)
    }
}

/// Decode one pgoutput message (the payload of an `XLogData` message).
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8()?;
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_ts: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_ts: r.i64()?,
        },
        b'O' => Message::Origin {
            lsn: r.u64()?,
            name: r.cstr()?,
        },
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(buf.len()));
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            id: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let relation = r.u32()?;
            r.expect_new()?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => Some((OldKind::Key, r.tuple()?)),
                b'O' => Some((OldKind::Full, r.tuple()?)),
                b'N' => {
                    r.pos -= 1;
                    None
                }
                other => {
                    r.pos -= 1;
                    return r.err(format!(
                        "expected 'K', 'O' or 'N' in update, got {:?}",
                        other as char
                    ));
                }
            };
            r.expect_new()?;
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = match r.u8()? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                other => {
                    r.pos -= 1;
                    return r.err(format!(
                        "expected 'K' or 'O' in delete, got {:?}",
                        other as char
                    ));
                }
            };
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            if n > (buf.len() - r.pos) / 4 {
                return r.err(format!(
                    "truncate claims {n} relations, too many for the bytes left"
                ));
            }
            let relations = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            let content = r.take(len)?;
            Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            }
        }
        other => {
            r.pos = 0;
            return r.err(format!("unknown message type {:?}", other as char));
        }
    };
    r.finish(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some("\u{0}toast") => b.push(b'u'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn relation() {
        let mut b = vec![b'R'];
        b.extend(16385u32.to_be_bytes());
        b.extend(b"public\0inferences\0");
        b.push(b'f');
        b.extend(2u16.to_be_bytes());
        b.push(1);
        b.extend(b"inference_id\0");
        b.extend(1043u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"contact_id\0");
        b.extend(1043u32.to_be_bytes());
        b.extend(68i32.to_be_bytes());
        let Message::Relation(rel) = decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(rel.id, 16385);
        assert_eq!(rel.name, "inferences");
        assert_eq!(rel.replica_identity, b'f');
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_modifier, 68);
    }

    #[test]
    fn insert_with_every_marker() {
        let mut b = vec![b'I'];
        b.extend(7u32.to_be_bytes());
        b.push(b'N');
        b.extend(tuple(&[Some("c-1"), None, Some("\u{0}toast")]));
        // append a binary value by hand: bump the count and add 'b'
        let count_at = 6;
        b[count_at..count_at + 2].copy_from_slice(&4u16.to_be_bytes());
        b.push(b'b');
        b.extend(2u32.to_be_bytes());
        b.extend([0xde, 0xad]);
        assert_eq!(
            decode(&b).unwrap(),
            Message::Insert {
                relation: 7,
                new: vec![
                    Value::Text(b"c-1"),
                    Value::Null,
                    Value::UnchangedToast,
                    Value::Binary(&[0xde, 0xad])
                ]
            }
        );
    }

    #[test]
    fn update_with_and_without_old() {
        let mut b = vec![b'U'];
        b.extend(7u32.to_be_bytes());
        b.push(b'N');
        b.extend(tuple(&[Some("x")]));
        let Message::Update { old: None, new, .. } = decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(new[0].as_str(), Some("x"));

        let mut b = vec![b'U'];
        b.extend(7u32.to_be_bytes());
        b.push(b'O');
        b.extend(tuple(&[Some("old")]));
        b.push(b'N');
        b.extend(tuple(&[Some("new")]));
        let Message::Update {
            old: Some((OldKind::Full, old)),
            new,
            ..
        } = decode(&b).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (old[0].as_str(), new[0].as_str()),
            (Some("old"), Some("new"))
        );
    }

    #[test]
    fn delete_key_and_truncate() {
        let mut b = vec![b'D'];
        b.extend(9u32.to_be_bytes());
        b.push(b'K');
        b.extend(tuple(&[Some("k"), None]));
        assert!(matches!(
            decode(&b).unwrap(),
            Message::Delete {
                relation: 9,
                old: (OldKind::Key, _)
            }
        ));

        let mut b = vec![b'T'];
        b.extend(2u32.to_be_bytes());
        b.push(1);
        b.extend(5u32.to_be_bytes());
        b.extend(6u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Truncate {
                options: 1,
                relations: vec![5, 6]
            }
        );
    }

    #[test]
    fn begin_commit_message() {
        let mut b = vec![b'B'];
        b.extend(100u64.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(42u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 100,
                commit_ts: 5,
                xid: 42
            }
        );

        let mut b = vec![b'M', 0];
        b.extend(77u64.to_be_bytes());
        b.extend(b"trusst-cdc.heartbeat\0");
        b.extend(2u32.to_be_bytes());
        b.extend(b"hi");
        assert!(matches!(
            decode(&b).unwrap(),
            Message::LogicalMessage { transactional: false, lsn: 77, ref prefix, .. } if prefix == "trusst-cdc.heartbeat"
        ));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert!(decode(&[]).is_err());
        assert!(decode(b"Z").is_err());
        // truncated length
        let mut b = vec![b'I'];
        b.extend(1u32.to_be_bytes());
        b.push(b'N');
        b.extend(1u16.to_be_bytes());
        b.push(b't');
        b.extend(100u32.to_be_bytes());
        b.extend(b"short");
        let e = decode(&b).unwrap_err();
        assert!(e.reason.contains("need 100 more bytes"), "{e}");
        // bad marker
        let mut b = vec![b'I'];
        b.extend(1u32.to_be_bytes());
        b.push(b'N');
        b.extend(1u16.to_be_bytes());
        b.push(b'x');
        assert!(
            decode(&b)
                .unwrap_err()
                .reason
                .contains("unknown tuple value marker")
        );
        // trailing bytes
        let mut b = vec![b'O'];
        b.extend(1u64.to_be_bytes());
        b.extend(b"o\0junk");
        assert!(decode(&b).unwrap_err().reason.contains("trailing"));
        // huge column count must not allocate
        let mut b = vec![b'I'];
        b.extend(1u32.to_be_bytes());
        b.push(b'N');
        b.extend(u16::MAX.to_be_bytes());
        assert!(decode(&b).is_err());
    }

    /// Arbitrary bytes never panic (the cargo-fuzz target explores this far more deeply).
    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"BCORYIUDTMZ";
        for _ in 0..200_000 {
            let len = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = b.first_mut() {
                *first = tags[(next() % tags.len() as u64) as usize];
            }
            let _ = decode(&b);
        }
    }
}
