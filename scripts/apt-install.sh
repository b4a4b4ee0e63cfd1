# apt_install PACKAGE...: install Debian packages as root, through passwordless sudo, or explain.
apt_install() {
    local runner=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            runner=(sudo)
        else
            echo "chatd needs the Debian package(s) $*: run 'sudo apt-get install $*' and try again" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "chatd needs $* but this system has no apt-get: install them with your package manager" >&2
        exit 1
    fi
    "${runner[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq "$@"
}
