//! Kubernetes names from the node itself. The kubelet keeps each container's logs under
//! `<log dir>/pods/<namespace>_<pod>_<pod uid>/<container>/` and links them from
//! `<log dir>/containers/<pod>_<namespace>_<container>-<container id>.log`; the directory
//! names are all a server's namespace, pod and container names take, with no API server,
//! no RBAC and no network. Namespaces, pods and containers are DNS names (no `_`), so the
//! names split unambiguously.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

/// The kubelet's log directory unless `--kubelet-log-dir` says otherwise.
pub const DEFAULT_LOG_DIR: &str = "/var/log";

static LOG_DIR: OnceLock<PathBuf> = OnceLock::new();

/// What the kubelet's log directories name, by pod uid and by container id; read again
/// when a pod or a container is not in it (a new one started since).
static CACHE: Mutex<Cache> = Mutex::new(Cache {
    pods: None,
    containers: None,
});

/// `--kubelet-log-dir`, set once at start (later calls are ignored).
pub fn set_log_dir(dir: PathBuf) {
    let _ = LOG_DIR.set(dir);
}

fn log_dir() -> &'static Path {
    LOG_DIR.get_or_init(|| PathBuf::from(DEFAULT_LOG_DIR))
}

/// A pod's names, and its container's where the container id is known and listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
}

struct Cache {
    /// pod uid -> (namespace, pod).
    pods: Option<HashMap<String, (String, String)>>,
    /// container id -> container name.
    containers: Option<HashMap<String, String>>,
}

/// The names of the pod `pod_uid` (and of its container `container_id`), from the kubelet's
/// log directories; `None` where the pod is not there (not a kubelet node, or the
/// directories are not mounted).
pub fn names(pod_uid: &str, container_id: Option<&str>) -> Option<PodNames> {
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let dir = log_dir();
    let pod_missing = !cache.pods.as_ref().is_some_and(|p| p.contains_key(pod_uid));
    if pod_missing {
        cache.pods = Some(read_pods(&dir.join("pods")));
    }
    let (namespace, pod) = cache.pods.as_ref()?.get(pod_uid)?.clone();
    let container = container_id.and_then(|id| {
        let listed = cache
            .containers
            .as_ref()
            .is_some_and(|c| c.contains_key(id));
        if !listed {
            cache.containers = Some(read_containers(&dir.join("containers")));
        }
        cache.containers.as_ref()?.get(id).cloned()
    });
    Some(PodNames {
        namespace,
        pod,
        container,
    })
}

/// `<namespace>_<pod>_<uid>` directories.
fn read_pods(dir: &Path) -> HashMap<String, (String, String)> {
    entries(dir)
        .filter_map(|name| {
            let (namespace, pod, uid) = pod_dir(&name)?;
            Some((uid.to_string(), (namespace.to_string(), pod.to_string())))
        })
        .collect()
}

/// `<pod>_<namespace>_<container>-<id>.log` links.
fn read_containers(dir: &Path) -> HashMap<String, String> {
    entries(dir)
        .filter_map(|name| {
            let (container, id) = container_link(&name)?;
            Some((id.to_string(), container.to_string()))
        })
        .collect()
}

fn entries(dir: &Path) -> impl Iterator<Item = String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
}

/// (namespace, pod, uid) of a `/var/log/pods` entry.
fn pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let (namespace, rest) = name.split_once('_')?;
    let (pod, uid) = rest.rsplit_once('_')?;
    (!namespace.is_empty() && !pod.is_empty() && uid.len() == 36).then_some((namespace, pod, uid))
}

/// (container, container id) of a `/var/log/containers` entry.
fn container_link(name: &str) -> Option<(&str, &str)> {
    let (rest, id) = name.strip_suffix(".log")?.rsplit_once('-')?;
    let mut parts = rest.splitn(3, '_');
    let (_pod, _namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    let is_id = id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit());
    (is_id && !container.is_empty()).then_some((container, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7e4d5a6b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d";
    const UID: &str = "1b2c3d4e-5f60-4718-9a0b-c1d2e3f4a5b6";

    #[test]
    fn pod_directories_split_at_the_underscores() {
        assert_eq!(
            pod_dir(&format!("kube-system_coredns-7db6d8ff4d-x2x9k_{UID}")),
            Some(("kube-system", "coredns-7db6d8ff4d-x2x9k", UID))
        );
        // Pod names may hold dots (DNS subdomains).
        assert_eq!(
            pod_dir(&format!("web_api.v2-0_{UID}")),
            Some(("web", "api.v2-0", UID))
        );
        assert_eq!(pod_dir("not-a-pod"), None);
        assert_eq!(pod_dir("a_b_short-uid"), None);
    }

    #[test]
    fn container_links_split_at_the_last_dash() {
        assert_eq!(
            container_link(&format!("api.v2-0_web_uvicorn-worker-{ID}.log")),
            Some(("uvicorn-worker", ID))
        );
        assert_eq!(container_link(&format!("p_ns_c-{}.log", &ID[..63])), None);
        assert_eq!(container_link("p_ns_c-x.txt"), None);
    }
}
