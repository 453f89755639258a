//! The `server` label: the kind of server a root process is, from its command line.

const KNOWN: [&str; 5] = ["uvicorn", "gunicorn", "granian", "hypercorn", "nginx"];

/// Python servers run as `python -m uvicorn`, `…/bin/gunicorn`, or retitle themselves
/// (`gunicorn: master [app]`, `nginx: master process …`); look at the first few words.
/// Anything else is named by its executable (argv[0]), which `comm` may truncate.
pub fn detect(cmdline: &[String], comm: &str) -> String {
    let words: Vec<&str> = cmdline
        .iter()
        .take(4)
        .filter_map(|arg| arg.split_whitespace().next())
        .map(|word| {
            word.rsplit('/')
                .next()
                .unwrap_or(word)
                .trim_end_matches(':')
        })
        .collect();
    if let Some(known) = words.iter().find_map(|w| KNOWN.iter().find(|k| *k == w)) {
        return (*known).to_string();
    }
    match words.first() {
        Some(exe) if !exe.is_empty() => (*exe).to_string(),
        _ => comm.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn recognises_the_common_launch_styles() {
        assert_eq!(
            detect(
                &argv("/venv/bin/python /venv/bin/uvicorn app:app --workers 2"),
                "python"
            ),
            "uvicorn"
        );
        assert_eq!(
            detect(&argv("python3 -m hypercorn app:app"), "python3"),
            "hypercorn"
        );
        assert_eq!(
            detect(&["gunicorn: master [app:app]".to_string()], "gunicorn"),
            "gunicorn"
        );
        assert_eq!(
            detect(
                &["nginx: master process /usr/sbin/nginx".to_string()],
                "nginx"
            ),
            "nginx"
        );
        assert_eq!(
            detect(
                &argv("/usr/local/bin/granian --interface asgi app:app"),
                "granian"
            ),
            "granian"
        );
    }

    #[test]
    fn falls_back_to_the_process_name() {
        assert_eq!(
            detect(
                &argv("/srv/bin/api-server-with-a-long-name --port 80"),
                "api-server-with"
            ),
            "api-server-with-a-long-name"
        );
        assert_eq!(detect(&[], "kworker"), "kworker");
    }
}
