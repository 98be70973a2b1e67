# Sourced, not run: fetches the runtime closure of a dependency-list pom from Maven Central into a
# cache folder, once. Used by scripts/services.sh (the Kafka broker) and scripts/bench-compare.sh
# (Kafka Connect and Debezium).
#
#   maven_fetch WHAT POM DEST [-Dname=value ...]
#
# WHAT names the download, versions included ("kafka 4.1.2"), in messages and in DEST/.stamp; the
# stamp also holds the pom's hash, so editing the pom or changing a version fetches again instead
# of silently running stale jars. Maven's own repository is $CACHE/m2 (CACHE must be set by the caller).

maven_fetch() {
    # Absolute: Maven resolves a relative output directory against the pom's folder.
    local what=$1 pom=$2 dest
    dest=$(realpath -m "$3")
    shift 3
    local stamp
    stamp="$what pom $(sha256sum "$pom" | cut -c1-16)"
    if [[ -f $dest/.stamp && $(<"$dest/.stamp") == "$stamp" ]]; then
        return
    fi
    command -v mvn >/dev/null || {
        echo "maven: error: mvn not found: Maven is needed to fetch $what from Maven Central" >&2
        return 1
    }
    echo "maven: fetching $what from Maven Central (first run only)" >&2
    local tmp=$dest.tmp log=$dest.fetch.log started=$SECONDS
    rm -rf "$tmp"
    mkdir -p "$(dirname "$dest")"
    if ! mvn -B -q -f "$pom" -Dmaven.repo.local="$CACHE/m2" "$@" \
        dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime >"$log" 2>&1; then
        echo "maven: last lines of $log:" >&2
        tail -n 40 "$log" | sed 's/^/    /' >&2
        echo "maven: error: could not fetch $what with Maven" >&2
        return 1
    fi
    # Callers test the result (`maven_fetch ... || die`), which turns off `set -e` in here.
    echo "$stamp" >"$tmp/.stamp" && rm -rf "$dest" && mv "$tmp" "$dest" || return 1
    echo "maven: fetched $(find "$dest" -type f ! -name .stamp | wc -l) files for $what in $((SECONDS - started))s" >&2
}
