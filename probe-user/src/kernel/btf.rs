//! Field offsets of kernel structs from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//! Rust eBPF programs carry no CO-RE relocations, so the daemon looks the offsets up here and
//! hands them to the programs as load-time constants. Only what that needs is parsed: the
//! type section's structs and unions, their members, and the modifiers in between; enums'
//! values; functions and the number of their parameters.

use std::{borrow::Cow, path::Path};

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF at {path}: {source} (the socket hooks need CONFIG_DEBUG_INFO_BTF)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's BTF has no field {path} in struct {ty}")]
    NoField { ty: String, path: String },
    #[error("field {path} of struct {ty} is a bitfield")]
    Bitfield { ty: String, path: String },
    #[error("the kernel's BTF has no value {value} in enum {ty}")]
    NoEnumValue { ty: String, value: String },
}

const MAGIC: u16 = 0xeb9f;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset from the start of the struct.
    bit_offset: u32,
    /// Non-zero for a bitfield.
    bit_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// Size in bytes (int, struct, union, enum) or the referenced type (modifiers, pointers).
    size_or_type: u32,
    members: Vec<Member>,
    /// An enum's (name, value) pairs.
    values: Vec<(u32, i64)>,
    /// A function prototype's parameter names.
    params: Vec<u32>,
}

pub struct Btf {
    /// Indexed by type id; id 0 is void.
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |off: usize| -> Result<u16, BtfError> {
            data.get(off..off + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        let u32_at = |off: usize| -> Result<u32, BtfError> {
            data.get(off..off + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if u16_at(0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = hdr_len + u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = hdr_len + u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let end = type_off + type_len;
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
            values: Vec::new(),
            params: Vec::new(),
        }];
        let mut off = type_off;
        while off < end {
            let name = u32_at(off)?;
            let info = u32_at(off + 4)?;
            let size_or_type = u32_at(off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let mut values = Vec::new();
            let mut params = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => off += 4,
                KIND_ARRAY => off += 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw = u32_at(m + 8)?;
                        let (bit_offset, bit_size) = if kind_flag {
                            (raw & 0x00ff_ffff, raw >> 24)
                        } else {
                            (raw, 0)
                        };
                        members.push(Member {
                            name: u32_at(m)?,
                            ty: u32_at(m + 4)?,
                            bit_offset,
                            bit_size,
                        });
                    }
                    off += vlen * 12;
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let m = off + i * 8;
                        values.push((u32_at(m)?, i64::from(u32_at(m + 4)? as i32)));
                    }
                    off += vlen * 8;
                }
                KIND_FUNC_PROTO => {
                    for i in 0..vlen {
                        params.push(u32_at(off + i * 8)?);
                    }
                    off += vlen * 8;
                }
                KIND_ENUM64 => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let value = u64::from(u32_at(m + 4)?) | (u64::from(u32_at(m + 8)?) << 32);
                        values.push((u32_at(m)?, value as i64));
                    }
                    off += vlen * 12;
                }
                KIND_DATASEC => off += vlen * 12,
                0 | 20.. => return Err(BtfError::Malformed("unknown type kind")),
                _ => {}
            }
            types.push(Type {
                name,
                kind,
                size_or_type,
                members,
                values,
                params,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> Cow<'_, str> {
        let start = off as usize;
        let rest = self.strings.get(start..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..len])
    }

    fn struct_named(&self, name: &str) -> Option<&Type> {
        // A struct may also appear as a forward declaration; the one with members is it.
        self.types
            .iter()
            .filter(|t| {
                (t.kind == KIND_STRUCT || t.kind == KIND_UNION) && self.name(t.name) == name
            })
            .max_by_key(|t| t.members.len())
    }

    /// Follow typedefs and qualifiers to the underlying type.
    fn resolved(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `path` (member names, outermost first) in struct `ty`. Members of
    /// anonymous structs and unions are found through them, as C names them.
    pub fn offset_of(&self, ty: &str, path: &[&str]) -> Result<u32, BtfError> {
        let no_field = || BtfError::NoField {
            ty: ty.into(),
            path: path.join("."),
        };
        let mut current = self
            .struct_named(ty)
            .ok_or_else(|| BtfError::NoStruct(ty.into()))?;
        let mut bits = 0u32;
        for (i, field) in path.iter().enumerate() {
            let (offset, member) = self.find_member(current, field, 0).ok_or_else(no_field)?;
            if member.bit_size != 0 || offset % 8 != 0 {
                return Err(BtfError::Bitfield {
                    ty: ty.into(),
                    path: path.join("."),
                });
            }
            bits += offset;
            if i + 1 < path.len() {
                current = self.resolved(member.ty).ok_or_else(no_field)?;
            }
        }
        Ok(bits / 8)
    }

    /// The value of `value` in `enum ty`.
    pub fn enum_value(&self, ty: &str, value: &str) -> Result<i64, BtfError> {
        self.types
            .iter()
            .filter(|t| (t.kind == KIND_ENUM || t.kind == KIND_ENUM64) && self.name(t.name) == ty)
            .flat_map(|t| t.values.iter())
            .find(|(name, _)| self.name(*name) == value)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::NoEnumValue {
                ty: ty.into(),
                value: value.into(),
            })
    }

    /// The parameter names of kernel function `name`, if the kernel's BTF has it.
    pub fn function_params(&self, name: &str) -> Option<Vec<String>> {
        let func = self
            .types
            .iter()
            .find(|t| t.kind == KIND_FUNC && self.name(t.name) == name)?;
        let proto = self.types.get(func.size_or_type as usize)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| {
            proto
                .params
                .iter()
                .map(|p| self.name(*p).into_owned())
                .collect()
        })
    }

    /// `name` among `ty`'s members, or inside its anonymous ones: (bit offset, member).
    /// Nesting is bounded: malformed BTF that names a struct inside itself ends the search.
    fn find_member<'a>(
        &'a self,
        ty: &'a Type,
        name: &str,
        depth: u32,
    ) -> Option<(u32, &'a Member)> {
        if depth > 8 {
            return None;
        }
        for m in &ty.members {
            if self.name(m.name) == name {
                return Some((m.bit_offset, m));
            }
        }
        for m in ty.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolved(m.ty)?;
            if let Some((off, found)) = self.find_member(inner, name, depth + 1) {
                return Some((m.bit_offset + off, found));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with: int (id 1), struct inner { int a; int b; } (id 2),
    /// struct outer { int x; union { struct inner in; int y; }; } (ids 3, 4),
    /// enum kind { K_A = 0, K_B = 7 } (id 5), int f(int, int) (ids 6, 7).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0in\0y\0kind\0K_A\0K_B\0f\0p\0q\0".to_vec();
        let at = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        push(&[at("int"), KIND_INT << 24, 4, 0x0100_0020]);
        push(&[at("inner"), (KIND_STRUCT << 24) | 2, 8]);
        push(&[at("a"), 1, 0, at("b"), 1, 32]);
        push(&[0, (KIND_UNION << 24) | 2, 8]);
        push(&[at("in"), 2, 0, at("y"), 1, 0]);
        push(&[at("outer"), (KIND_STRUCT << 24) | 2, 12]);
        push(&[at("x"), 1, 0, 0, 3, 32]);
        push(&[at("kind"), (KIND_ENUM << 24) | 2, 4]);
        push(&[at("K_A"), 0, at("K_B"), 7]);
        push(&[0, (KIND_FUNC_PROTO << 24) | 2, 1]);
        push(&[at("p"), 1, at("q"), 1]);
        push(&[at("f"), KIND_FUNC << 24, 6]);
        let mut out = Vec::new();
        for w in [
            0x0001_eb9fu32,
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_fields_through_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset_of("outer", &["x"]).unwrap(), 0);
        assert_eq!(btf.offset_of("outer", &["y"]).unwrap(), 4);
        assert_eq!(btf.offset_of("outer", &["in", "b"]).unwrap(), 8);
        assert!(matches!(
            btf.offset_of("outer", &["nope"]),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.offset_of("missing", &["x"]),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn finds_enum_values_and_function_parameters() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.enum_value("kind", "K_A").unwrap(), 0);
        assert_eq!(btf.enum_value("kind", "K_B").unwrap(), 7);
        assert!(btf.enum_value("kind", "K_C").is_err());
        assert_eq!(btf.function_params("f").unwrap(), ["p", "q"]);
        assert_eq!(btf.function_params("g"), None);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"\x7fELF....").is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    /// On the running kernel (every Linux the project targets has BTF): the socket fields
    /// the programs read are where the kernel says.
    #[test]
    fn the_running_kernel_has_the_fields_the_socket_hooks_read() {
        let Ok(btf) = Btf::from_sys_fs() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no {VMLINUX}: CI runs on a kernel with BTF"
            );
            return;
        };
        // struct sock starts with struct sock_common.
        assert_eq!(btf.offset_of("sock", &["__sk_common"]).unwrap(), 0);
        let family = btf.offset_of("sock_common", &["skc_family"]).unwrap();
        let num = btf.offset_of("sock_common", &["skc_num"]).unwrap();
        assert!(family < 64 && num < 64, "{family} {num}");
        btf.offset_of("task_struct", &["exit_code"]).unwrap();
        // The fentry set's functions and iterator.
        // tcp_recvmsg lost its addr_len parameter in 6.16; flags stays fourth.
        let recv = btf.function_params("tcp_recvmsg").unwrap();
        assert_eq!(recv[..4], ["sk", "msg", "len", "flags"]);
        assert_eq!(
            btf.function_params("tcp_sendmsg").unwrap(),
            ["sk", "msg", "size"]
        );
        btf.enum_value("iter_type", "ITER_UBUF").unwrap();
        btf.enum_value("iter_type", "ITER_IOVEC").unwrap();
        assert_eq!(
            btf.offset_of("iov_iter", &["ubuf"]).unwrap(),
            btf.offset_of("iov_iter", &["__iov"]).unwrap()
        );
    }
}
