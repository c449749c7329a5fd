//! Byte offsets of kernel struct members, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). The redirect tracepoints need three of them (`net_device.ifindex`,
//! `net_device.nd_net`, `net.net_cookie`); aya-obj parses BTF but keeps member offsets to
//! itself, so this reads just the type section, as the kernel's `btf.h` lays it out.

use std::{collections::HashMap, io};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("not BTF data: {0}")]
    Format(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
}

/// One struct or union member.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

/// What this reader keeps of a type.
#[derive(Clone, Debug)]
enum Type {
    /// A struct or union, with its members.
    Composite(Vec<Member>),
    /// A typedef, const, volatile, restrict or type tag: refers to `0`.
    Alias(u32),
    Other,
}

/// The types of one BTF blob, by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self, BtfError> {
        let path = crate::paths::KERNEL_BTF;
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (header, type section, string section).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |d: &[u8], o: usize| {
            d.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(BTF_MAGIC) {
            return Err(BtfError::Format("bad magic (or not little-endian)"));
        }
        let field = |o| u32_at(data, o).ok_or(BtfError::Format("truncated header"));
        let hdr_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Format("section outside the data"))
        };
        let types_sec = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let name = |off: u32| -> String {
            let rest = strings.get(off as usize..).unwrap_or_default();
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        };

        let mut types = vec![Type::Other];
        let mut structs = HashMap::new();
        let mut at = 0;
        while at < types_sec.len() {
            let word =
                |i: usize| u32_at(types_sec, at + 4 * i).ok_or(BtfError::Format("truncated type"));
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => 0,
            };
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for m in 0..vlen {
                        let base = 3 + 3 * m;
                        let offset = word(base + 2)?;
                        members.push(Member {
                            name: name(word(base)?),
                            type_id: word(base + 1)?,
                            // With kind_flag the top 8 bits are a bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    let n = name(name_off);
                    if kind == KIND_STRUCT && !n.is_empty() {
                        structs.entry(n.clone()).or_insert(types.len() as u32);
                    }
                    Type::Composite(members)
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                _ => Type::Other,
            };
            types.push(ty);
            at += 12 + extra;
        }
        Ok(Self { types, structs })
    }

    /// The byte offset of `path` (members separated by dots, e.g. `"nd_net.net"`) inside
    /// struct `strukt`. Members of anonymous structs and unions are found as the C compiler
    /// finds them.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let no_member = || BtfError::NoMember {
            strukt: strukt.into(),
            member: path.into(),
        };
        let mut id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut bits = 0;
        for part in path.split('.') {
            let (type_id, at) = self.find(id, part, 0).ok_or_else(no_member)?;
            bits += at;
            id = self.resolve(type_id);
        }
        if bits % 8 != 0 {
            return Err(no_member());
        }
        Ok(bits / 8)
    }

    /// Member `name` of composite `id` (searching anonymous members too): its type and bit
    /// offset from the start of `id`, plus `base`.
    fn find(&self, id: u32, name: &str, base: u32) -> Option<(u32, u32)> {
        let Some(Type::Composite(members)) = self.types.get(id as usize) else {
            return None;
        };
        members.iter().find_map(|m| {
            if m.name == name {
                Some((m.type_id, base + m.bit_offset))
            } else if m.name.is_empty() {
                self.find(self.resolve(m.type_id), name, base + m.bit_offset)
            } else {
                None
            }
        })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias(next)) => id = *next,
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words) rows.
    fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut strs = vec![0u8];
        for s in strings {
            strs.extend_from_slice(s.as_bytes());
            strs.push(0);
        }
        let mut tys = Vec::new();
        for (name, info, st, extra) in types {
            for w in [*name, *info, *st].iter().chain(extra) {
                tys.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            tys.len() as u32,
            tys.len() as u32,
            strs.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend(tys);
        out.extend(strs);
        out
    }

    /// Offset of string `s` in the table `blob` builds from `strings`.
    fn at(strings: &[&str], s: &str) -> u32 {
        let mut off = 1;
        for x in strings {
            if *x == s {
                return off;
            }
            off += x.len() as u32 + 1;
        }
        panic!("{s} not in the table")
    }

    #[test]
    fn finds_members_through_typedefs_and_anonymous_unions() {
        let s = [
            "int", "net", "cookie", "wrap", "p", "dev", "ifindex", "nd_net", "net_t",
        ];
        let info = |kind: u32, vlen: u32, flag: bool| (kind << 24) | vlen | ((flag as u32) << 31);
        let types = vec![
            // 1: int
            (at(&s, "int"), info(KIND_INT, 0, false), 4, vec![32]),
            // 2: struct net { int pad; u64 cookie at byte 16 }
            (
                at(&s, "net"),
                info(KIND_STRUCT, 2, false),
                24,
                vec![0, 1, 0, at(&s, "cookie"), 1, 128],
            ),
            // 3: typedef struct { struct net *p } net_t  -> 4
            (at(&s, "net_t"), info(KIND_TYPEDEF, 0, false), 4, vec![]),
            // 4: anonymous struct { p at 0 }
            (0, info(KIND_STRUCT, 1, false), 8, vec![at(&s, "p"), 1, 0]),
            // 5: anonymous union { int ifindex at 0 }
            (
                0,
                info(KIND_UNION, 1, false),
                4,
                vec![at(&s, "ifindex"), 1, 0],
            ),
            // 6: struct dev { nd_net (net_t) at byte 8; anonymous union at byte 40 } (bitfield
            //    encoding: kind_flag set, size in the top byte)
            (
                at(&s, "dev"),
                info(KIND_STRUCT, 2, true),
                64,
                vec![at(&s, "nd_net"), 3, 64, 0, 5, (32 << 24) | 320],
            ),
        ];
        let btf = Btf::parse(&blob(&s, &types)).unwrap();
        assert_eq!(btf.offset("net", "cookie").unwrap(), 16);
        assert_eq!(btf.offset("dev", "ifindex").unwrap(), 40);
        assert_eq!(btf.offset("dev", "nd_net").unwrap(), 8);
        assert_eq!(btf.offset("dev", "nd_net.p").unwrap(), 8);
        assert!(matches!(
            btf.offset("dev", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.offset("nope", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"\x7fELF...."),
            Err(BtfError::Format(_))
        ));
        let mut b = blob(&[], &[]);
        b.truncate(10);
        assert!(Btf::parse(&b).is_err());
    }

    /// The running kernel's layout: what the tracepoints use must be there.
    #[test]
    fn the_running_kernel_has_the_members_the_tracepoints_read() {
        let btf = Btf::kernel().unwrap();
        let ifindex = btf.offset("net_device", "ifindex").unwrap();
        let nd_net = btf.offset("net_device", "nd_net.net").unwrap();
        let cookie = btf.offset("net", "net_cookie").unwrap();
        assert!(ifindex > 0 && nd_net > 0 && cookie > 0);
        assert_ne!(ifindex, nd_net);
    }
}
