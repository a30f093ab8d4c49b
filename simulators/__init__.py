"""Stand-ins for the third-party peers around the gateway: scanners, archives and serial devices.

The simulators speak DICOM through pydicom and pynetdicom only and never import `gateway`, so that tests
exercise the gateway the way real hardware would.
"""
