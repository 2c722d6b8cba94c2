//! Giving back memory that only start-up needed: the heap it freed, and the pages of
//! code and read-only data it ran once (argument and YAML parsing, the kernel programs'
//! loader, a full list from the Kubernetes API).

/// Gives memory that start-up used back to the kernel: freed heap pages (glibc keeps
/// them resident until told otherwise) and the mapped pages of code and read-only
/// data. Loading the kernel programs parses the kernel's BTF (megabytes) and frees it
/// again, and so does a full list from the Kubernetes API; this runs before serving
/// and after each full list. Code still in use faults back in from the page cache.
pub fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
    let dropped = match std::fs::read_to_string("/proc/self/smaps") {
        Ok(smaps) => clean_file_mappings(&smaps)
            .into_iter()
            .filter(|&(start, end)| {
                // SAFETY: the range is a private, read-only mapping of a file with no
                // page of its own (no copy-on-write page): dropping its pages loses
                // nothing, a later access reads them again from the file.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) == 0
                }
            })
            .count(),
        Err(error) => {
            tracing::debug!(%error, "reading /proc/self/smaps");
            0
        }
    };
    tracing::debug!(dropped, "released start-up memory");
}

/// The address ranges of `smaps` that can be dropped without losing anything: private
/// mappings of a file, not writable, holding no anonymous (copy-on-write) page. That
/// excludes the relocated read-only data (RELRO), which the loader wrote before making
/// it read-only.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(range) = mapping_header(line) {
            current = range;
        } else if let Some(anonymous) = line.strip_prefix("Anonymous:") {
            let clean = anonymous.trim().strip_suffix("kB").map(str::trim) == Some("0");
            if let (Some(range), true) = (current.take(), clean) {
                ranges.push(range);
            }
        }
    }
    ranges
}

/// Parses a mapping's header line (`start-end perms offset dev inode path`): `None`
/// when the line is not a header, `Some(None)` for a mapping that must stay.
fn mapping_header(line: &str) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let path = fields.nth(3);
    let droppable = perms.len() == 4
        && !perms.contains('w')
        && perms.ends_with('p')
        && path.is_some_and(|path| path.starts_with('/'));
    Some(droppable.then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55a9999b6000-55a999d25000 r--p 00000000 fe:00 10010924                   /usr/bin/sidecar
Size:               3516 kB
Rss:                 960 kB
Anonymous:             0 kB
55a999d25000-55a99a710000 r-xp 0036e000 fe:00 10010924                   /usr/bin/sidecar
Size:              10156 kB
Anonymous:             0 kB
55a99a710000-55a99a7a6000 r--p 00d58000 fe:00 10010924                   /usr/bin/sidecar
Size:                600 kB
Anonymous:           596 kB
55a99a7a6000-55a99a7ab000 rw-p 00deb000 fe:00 10010924                   /usr/bin/sidecar
Anonymous:             0 kB
55a9b63b0000-55a9b65fd000 rw-p 00000000 00:00 0                          [heap]
Anonymous:           648 kB
7f332c711000-7f332c752000 r--s 00001000 00:10 17                         anon_inode:bpf-map
Anonymous:             0 kB
7f332c77a000-7f332c8d0000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f332c8d0000-7f332c8d1000 r--s 00000000 fe:00 326279                     /dev/shm/shared
Anonymous:             0 kB
7ffe1f3f0000-7ffe1f3f2000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
7ffe1f3f3000-7ffe1f3f4000 r--p 00000000 00:00 0 
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_private_file_mappings_are_dropped() {
        assert_eq!(
            clean_file_mappings(SMAPS),
            vec![
                (0x55a9999b6000, 0x55a999d25000),
                (0x55a999d25000, 0x55a99a710000),
                (0x7f332c77a000, 0x7f332c8d0000),
            ]
        );
    }

    fn own_code_resident_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("own executable");
        let exe = exe.to_string_lossy().into_owned();
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut own = false;
        let mut total = 0;
        for line in smaps.lines() {
            if mapping_header(line).is_some() {
                own = line.contains(" r-xp ") && line.ends_with(exe.as_str());
            } else if let (true, Some(rss)) = (own, line.strip_prefix("Rss:")) {
                total += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .expect("Rss kB");
            }
        }
        total
    }

    #[test]
    fn releasing_unmaps_code_and_the_process_keeps_running() {
        // The release and the measuring run code of their own: have it resident
        // first, with some more code run once (as start-up does), so that the figures
        // compare what the release drops, not what it pages in (in a process that
        // runs this test alone, little else is resident).
        release_startup_memory();
        let warm: serde_json::Value = serde_json::from_str(r#"{"warm":[1.5,"x"]}"#).expect("json");
        assert_eq!(format!("{warm}").len(), 18);
        let before = own_code_resident_kib();
        assert!(before > 0, "no resident code found for the test binary");
        release_startup_memory();
        let after = own_code_resident_kib();
        assert!(
            after < before,
            "code resident before {before} KiB, after {after} KiB"
        );
        // Relocated data (vtables, formatting tables) must have survived: a dropped
        // RELRO page would read back unrelocated pointers and crash here.
        let shown: Vec<Box<dyn std::fmt::Display>> = vec![Box::new(1.5f64), Box::new("x")];
        let text = shown
            .iter()
            .map(|v| format!("{v:>4}"))
            .collect::<Vec<_>>()
            .join("|");
        assert_eq!(text, " 1.5|   x");
        let parsed: serde_json::Value = serde_json::from_str(r#"{"a":[1,2]}"#).expect("json");
        assert_eq!(parsed["a"][1], 2);
    }
}
