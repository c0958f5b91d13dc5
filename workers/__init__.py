"""visabus.workers"""
