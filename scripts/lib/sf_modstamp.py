"""When the emulated Salesforce last wrote a contact: the record's SystemModstamp, read as any
client reads it (GET by external id), shared by the benchmarks that measure commit-to-CRM."""
import datetime
import json
import urllib.error
import urllib.parse
import urllib.request


def reader(base):
    """A function contact -> (contact, SystemModstamp in ms since the epoch, or None if absent)."""
    token = json.load(urllib.request.urlopen(base + "/services/oauth2/token", data=urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": "trusst-sf-client",
         "client_secret": "trusst-sf-secret"}).encode()))["access_token"]

    def modstamp(contact):
        req = urllib.request.Request(f"{base}/services/data/v62.0/sobjects/Contact/Trusst_Contact_ID__c/{contact}",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            stamp = json.load(urllib.request.urlopen(req))["SystemModstamp"]
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise SystemExit(f"bench: GET of {contact} answered HTTP {e.code}: {e.read()[:300]!r}")
            return contact, None
        return contact, datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000

    return modstamp
