"""visabus.broker"""
