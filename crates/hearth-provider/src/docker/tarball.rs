//! Image tarballs a user uploads (`docker save` output), made safe to `docker load`.
//!
//! `docker load` tags what it loads with the names in the tarball's `manifest.json`
//! (`RepoTags`), or its legacy `repositories` file: a tarball naming `hearth/base:latest`
//! would replace the server's image for everyone. So the tarball is copied entry by entry:
//! `manifest.json` must describe exactly one image and its names are replaced by the one
//! Hearth gives; `repositories`, and the OCI `index.json` and `oci-layout` (whose
//! annotations newer engines read as names), are left out. Everything else (the image's
//! config and layers) passes as it is: the engine checks those itself.

use std::io::Read;
use std::path::{Component, Path};

/// The most entries a tarball may have (a `docker save` of one image has a few per layer).
const MAX_ENTRIES: usize = 100_000;
/// The largest `manifest.json` read.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Copies the `docker save` tarball `from` into `to` with `tag` as the only name of its one
/// image. The error says what is wrong with the tarball, for its uploader.
///
/// Every entry is written anew under the name this function read and checked (extended
/// PAX or GNU long names included), so what the engine reads is what was checked: no name
/// twice, regular files, directories, and symbolic links that stay inside the archive only.
pub fn sanitize(from: &Path, to: &Path, tag: &str) -> Result<(), String> {
    let input = std::fs::File::open(from).map_err(|e| format!("cannot read the upload: {e}"))?;
    let output = std::fs::File::create(to).map_err(|e| format!("cannot write a copy: {e}"))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(input));
    let mut copy = tar::Builder::new(std::io::BufWriter::new(output));
    let not_tar =
        |e: std::io::Error| format!("it is not a tar archive (`docker save` makes one): {e}");
    let write_failed = |e: std::io::Error| format!("cannot write a copy: {e}");
    let mut seen = std::collections::HashSet::new();
    let mut manifest_seen = false;
    for (n, entry) in archive.entries().map_err(not_tar)?.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(format!("it has more than {MAX_ENTRIES} entries"));
        }
        let mut entry = entry.map_err(not_tar)?;
        let path = entry.path().map_err(not_tar)?.into_owned();
        let parts = inside(&path, &[]).ok_or_else(|| {
            format!(
                "entry {} leaves the archive (absolute, or through '..')",
                path.display()
            )
        })?;
        if parts.is_empty() {
            continue;
        }
        let name = parts.join("/");
        if !seen.insert(name.clone()) {
            return Err(format!("entry {name} appears twice"));
        }
        let kind = entry.header().entry_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_mtime(entry.header().mtime().unwrap_or(0));
        match name.as_str() {
            "repositories" | "index.json" | "oci-layout" => continue,
            "manifest.json" => {
                if !kind.is_file() {
                    return Err("its manifest.json is not a file".into());
                }
                if entry.size() > MAX_MANIFEST_BYTES {
                    return Err("its manifest.json is over 1 MiB".into());
                }
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| format!("its manifest.json is unreadable: {e}"))?;
                let renamed = rename(&text, tag)?;
                header.set_size(renamed.len() as u64);
                copy.append_data(&mut header, &name, renamed.as_bytes())
                    .map_err(write_failed)?;
                manifest_seen = true;
            }
            _ if kind.is_file() => {
                header.set_size(entry.size());
                copy.append_data(&mut header, &name, &mut entry)
                    .map_err(write_failed)?;
            }
            _ if kind.is_dir() => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                copy.append_data(&mut header, &name, std::io::empty())
                    .map_err(write_failed)?;
            }
            _ if kind.is_symlink() => {
                // `docker save` links a layer that two images share; it must resolve inside.
                let target = entry
                    .link_name()
                    .map_err(not_tar)?
                    .ok_or_else(|| format!("link {name} has no target"))?
                    .into_owned();
                let parent: Vec<String> = parts[..parts.len() - 1].to_vec();
                if target.is_absolute() || inside(&target, &parent).is_none() {
                    return Err(format!(
                        "link {name} points outside the archive ({})",
                        target.display()
                    ));
                }
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                copy.append_link(&mut header, &name, &target)
                    .map_err(write_failed)?;
            }
            _ => {
                return Err(format!(
                    "entry {name} is a {kind:?}: only files, directories and links inside the archive are loaded"
                ));
            }
        }
    }
    if !manifest_seen {
        return Err("it has no manifest.json: upload what `docker save IMAGE` writes".into());
    }
    copy.into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| format!("cannot write a copy: {e}"))
}

/// `path`'s components, resolved from the directory `under` (components themselves), if
/// they stay inside the archive: `None` for an absolute path or one that climbs out.
fn inside(path: &Path, under: &[String]) -> Option<Vec<String>> {
    let mut parts = under.to_vec();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts)
}

/// `manifest.json` with `tag` as the only name of its only image.
fn rename(manifest: &str, tag: &str) -> Result<String, String> {
    let mut images: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(manifest)
            .map_err(|e| format!("its manifest.json is not a list of images: {e}"))?;
    if images.len() != 1 {
        return Err(format!(
            "it holds {} images; upload one (`docker save` with one image)",
            images.len()
        ));
    }
    if !images[0].get("Config").is_some_and(|c| c.is_string()) {
        return Err("its manifest.json names no image config".into());
    }
    images[0].insert("RepoTags".into(), serde_json::json!([tag]));
    Ok(serde_json::to_string(&images).expect("serializable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut builder = tar::Builder::new(file.reopen().unwrap());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap();
        file
    }

    fn names(path: &Path) -> Vec<(String, String)> {
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().to_string();
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                (name, text)
            })
            .collect()
    }

    #[test]
    fn only_the_given_name_reaches_the_engine() {
        let manifest = br#"[{"Config":"abc.json","RepoTags":["hearth/base:latest","x:1"],"Layers":["l/layer.tar"]}]"#;
        let upload = tarball(&[
            ("abc.json", b"{}"),
            ("l/layer.tar", b"layer"),
            ("manifest.json", manifest),
            ("repositories", br#"{"hearth/base":{"latest":"abc"}}"#),
            ("index.json", b"{}"),
            ("oci-layout", b"{}"),
        ]);
        let out = tempfile::NamedTempFile::new().unwrap();
        sanitize(upload.path(), out.path(), "hearth-import:i1").unwrap();
        let copied = names(out.path());
        let listed: Vec<&str> = copied.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(listed, ["abc.json", "l/layer.tar", "manifest.json"]);
        let manifest: serde_json::Value = serde_json::from_str(&copied[2].1).unwrap();
        assert_eq!(
            manifest[0]["RepoTags"],
            serde_json::json!(["hearth-import:i1"])
        );
        assert_eq!(manifest[0]["Layers"], serde_json::json!(["l/layer.tar"]));
        assert_eq!(copied[1].1, "layer");
    }

    #[test]
    fn what_is_not_one_saved_image_is_refused_with_the_reason() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let refuse = |entries: &[(&str, &[u8])]| {
            sanitize(tarball(entries).path(), out.path(), "t:1").unwrap_err()
        };
        assert!(refuse(&[("abc.json", b"{}")]).contains("no manifest.json"));
        assert!(
            refuse(&[("manifest.json", br#"[{"Config":"a"},{"Config":"b"}]"#)])
                .contains("holds 2 images")
        );
        assert!(refuse(&[("manifest.json", b"{nope")]).contains("not a list"));
        assert!(refuse(&[("manifest.json", br#"[{"RepoTags":[]}]"#)]).contains("no image config"));
        let garbage = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(garbage.path(), vec![0x42u8; 3000]).unwrap();
        let e = sanitize(garbage.path(), out.path(), "t:1").unwrap_err();
        assert!(
            e.contains("not a tar archive") || e.contains("no manifest.json"),
            "{e}"
        );
    }

    /// A tar header written by hand: what `tar::Builder` refuses to write.
    fn raw_entry(name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        header.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(kind);
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn archive(entries: &[Vec<u8>]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut data = entries.concat();
        data.extend_from_slice(&[0u8; 1024]);
        std::fs::write(file.path(), data).unwrap();
        file
    }

    const MANIFEST: &[u8] = br#"[{"Config":"c.json","RepoTags":["hearth/base:latest"]}]"#;

    #[test]
    fn a_second_manifest_under_another_spelling_is_refused() {
        let out = tempfile::NamedTempFile::new().unwrap();
        for second in [
            &b".//manifest.json"[..],
            b"./manifest.json",
            b"x/../manifest.json",
        ] {
            let upload = archive(&[
                raw_entry(b"manifest.json", tar::EntryType::Regular, b"", MANIFEST),
                raw_entry(second, tar::EntryType::Regular, b"", MANIFEST),
            ]);
            let e = sanitize(upload.path(), out.path(), "t:1").unwrap_err();
            assert!(e.contains("appears twice"), "{e}");
        }
    }

    #[test]
    fn a_long_name_is_written_as_it_was_checked() {
        // A PAX header names the entry `manifest.json`; the plain header says `x`.
        let mut pax = tar::Header::new_ustar();
        let record = b"22 path=manifest.json\n";
        pax.set_path("PaxHeaders/x").unwrap();
        pax.set_size(record.len() as u64);
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_cksum();
        let mut first = pax.as_bytes().to_vec();
        first.extend_from_slice(record);
        first.resize(first.len().div_ceil(512) * 512, 0);
        let upload = archive(&[
            first,
            raw_entry(b"x", tar::EntryType::Regular, b"", MANIFEST),
        ]);
        let out = tempfile::NamedTempFile::new().unwrap();
        sanitize(upload.path(), out.path(), "hearth-import:i2").unwrap();
        let copied = names(out.path());
        assert_eq!(copied.len(), 1);
        assert_eq!(copied[0].0, "manifest.json");
        assert!(copied[0].1.contains("hearth-import:i2"), "{:?}", copied[0]);
        assert!(!copied[0].1.contains("hearth/base"), "{:?}", copied[0]);
    }

    #[test]
    fn links_stay_inside_and_other_kinds_are_refused() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let manifest = raw_entry(b"manifest.json", tar::EntryType::Regular, b"", MANIFEST);
        // The link `docker save` makes for a shared layer passes, as a link.
        let upload = archive(&[
            raw_entry(b"a/layer.tar", tar::EntryType::Regular, b"", b"layer"),
            raw_entry(
                b"b/layer.tar",
                tar::EntryType::Symlink,
                b"../a/layer.tar",
                b"",
            ),
            manifest.clone(),
        ]);
        sanitize(upload.path(), out.path(), "t:1").unwrap();
        let mut copied = tar::Archive::new(std::fs::File::open(out.path()).unwrap());
        let kinds: Vec<(String, tar::EntryType)> = copied
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(
            kinds[1],
            ("b/layer.tar".to_string(), tar::EntryType::Symlink)
        );
        for (link, kind, why) in [
            (
                &b"../../etc/passwd"[..],
                tar::EntryType::Symlink,
                "points outside",
            ),
            (b"/etc/passwd", tar::EntryType::Symlink, "points outside"),
            (b"a/layer.tar", tar::EntryType::Link, "only files"),
            (b"", tar::EntryType::Char, "only files"),
            (b"", tar::EntryType::Fifo, "only files"),
        ] {
            let upload = archive(&[raw_entry(b"b/odd", kind, link, b""), manifest.clone()]);
            let e = sanitize(upload.path(), out.path(), "t:1").unwrap_err();
            assert!(e.contains(why), "{kind:?} {e}");
        }
    }

    #[test]
    fn an_entry_that_leaves_the_archive_is_refused() {
        // `tar::Builder` refuses to write such paths, so the header is written by hand.
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..11].copy_from_slice(b"../escape\0\0");
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut data = header.as_bytes().to_vec();
        data.extend_from_slice(b"x");
        data.resize(512 * 2, 0);
        data.extend_from_slice(&[0u8; 1024]);
        std::fs::write(file.path(), data).unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let e = sanitize(file.path(), out.path(), "t:1").unwrap_err();
        assert!(e.contains("leaves the archive"), "{e}");
    }
}
